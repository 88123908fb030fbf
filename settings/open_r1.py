"""`rsft settings import-open-r1`: an open-r1 SFT recipe (`recipes/<model>/sft/config_*.yaml`:
TRL's SFTConfig plus open-r1's model and dataset arguments) → our settings YAML.

Keys the alias table (`settings.aliases`) maps one to one are copied; the rest have a rule here
(a Hub name becomes `hf://…`, a scheduler name becomes a decay style, a ratio becomes steps, …)
or are listed as not mapped, each with why. A key whose target this version does not have is
listed too, never written, so the output always loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from settings.aliases import ALIASES, LEAVES, normalise
from settings.models import PipelineSettings

KNOWN_KEYS = {key for keys in LEAVES.values() for key in keys}

# Keys with no equivalent here, and why (the TRL / transformers / open-r1 ones recipes carry).
NO_EQUIVALENT = {
    "attn_implementation": "megatron-core picks the attention kernel (Transformer Engine's "
                           "fused attention on a GPU when installed)",
    "torch_dtype": "the Megatron checkpoint keeps the model's dtype (convert.dtype: source); "
                   "bf16/fp16 set the compute precision",
    "dtype": "the Megatron checkpoint keeps the model's dtype (convert.dtype: source); "
             "bf16/fp16 set the compute precision",
    "eos_token": "a turn ends with the chat template's end-of-turn token; change the template "
                 "(chat_template) to change it",
    "do_eval": "evaluation is the evaluate stage (lighteval on the exported model)",
    "eval_strategy": "evaluation is the evaluate stage (lighteval on the exported model)",
    "evaluation_strategy": "evaluation is the evaluate stage (lighteval on the exported model)",
    "eval_steps": "evaluation is the evaluate stage (lighteval on the exported model)",
    "per_device_eval_batch_size": "no loss evaluation during training; evaluate.batch_size is "
                                  "the generation batch of the evaluate stage",
    "hub_strategy": "the export is pushed once, after evaluate (export.push)",
    "log_level": "Prefect's logging settings (PREFECT_LOGGING_LEVEL) decide it",
    "logging_strategy": "metrics are logged every train.log_interval steps",
    "logging_first_step": "metrics are logged every train.log_interval steps",
    "overwrite_output_dir": "artifacts are content-addressed: nothing is overwritten",
    "save_only_model": "checkpoints always hold the optimizer state (exact resume)",
    "use_liger": "megatron-core's own fused kernels are used",
    "use_liger_kernel": "megatron-core's own fused kernels are used",
    "gradient_checkpointing_kwargs": "recomputation is megatron-core's (train.recompute)",
    "wandb_entity": "Weights & Biases settings belong with train.report_to",
    "wandb_project": "Weights & Biases settings belong with train.report_to",
    "wandb_run_group": "Weights & Biases settings belong with train.report_to",
    "optim": "the optimizer is megatron-core's Adam with decoupled weight decay",
    "callbacks": "no trainer callbacks; Prefect runs the pipeline",
    "benchmarks": "evaluate.tasks names the lighteval tasks",
    "ddp_timeout": "train.timeout_minutes bounds the whole training job",
    "completion_only_loss": "the loss always covers only the assistant answers",
    "assistant_only_loss": "the loss always covers only the assistant answers",
    "dataset_text_field": "records become chat messages (dataset.sources[].fields)",
    "system_prompt": "add the system turn to the data",
}

DECAY_STYLES = {"cosine": "cosine", "cosine_with_min_lr": "cosine", "linear": "linear",
                "constant": "constant", "constant_with_warmup": "constant"}


@dataclass
class Imported:
    settings: dict[str, Any] = field(default_factory=dict)
    """Our settings (nested), as the output YAML holds them."""
    not_mapped: list[tuple[str, str]] = field(default_factory=list)
    """(their key, why) for each key not carried over."""
    notes: list[tuple[str, str]] = field(default_factory=list)
    """(their key, how it was carried over) where the meaning shifts."""
    chat_template: str | None = None
    """The recipe's inline chat template, to write beside the output YAML."""

    def put(self, their: str, ours: str, value: Any) -> bool:
        """Set `ours`; a key this version lacks is reported instead (False)."""
        if ours not in KNOWN_KEYS:
            self.skip(their, f"{ours} is not a setting of this version")
            return False
        node = self.settings
        *sections, leaf = ours.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
        return True

    def skip(self, their: str, why: str) -> None:
        self.not_mapped.append((their, why))


Rule = Callable[[Any, dict[str, Any], Imported], None]


def _model(value: Any, recipe: dict[str, Any], out: Imported) -> None:
    name = str(value)
    revision = recipe.get("model_revision") or "main"
    local = name.startswith(("/", ".", "~"))
    out.put("model_name_or_path", "download.source", name if local else f"hf://{name}@{revision}")


def _dataset_name(value: Any, recipe: dict[str, Any], out: Imported) -> None:
    if recipe.get("dataset_mixture"):
        out.skip("dataset_name", "dataset_mixture gives the sources")
        return
    source: dict[str, Any] = {"path": f"hf://{value}"}
    configs = recipe.get("dataset_config") or recipe.get("dataset_configs")
    if isinstance(configs, list):  # older recipes: a list of configurations, one source each
        sources = [{**source, "name": c} for c in configs]
    else:
        sources = [{**source, "name": configs} if configs else source]
    if split := recipe.get("dataset_train_split"):
        sources = [{**s, "split": split} for s in sources]
    out.put("dataset_name", "dataset.sources", sources)


def _mixture(value: Any, recipe: dict[str, Any], out: Imported) -> None:
    if not isinstance(value, dict) or not isinstance(value.get("datasets"), list):
        out.skip("dataset_mixture", "expected {datasets: [{id, config, split, columns, weight}]}")
        return
    sources = []
    for d in value["datasets"]:
        source: dict[str, Any] = {"path": f"hf://{d['id']}"}
        if d.get("config"):
            source["name"] = d["config"]
        if d.get("split"):
            source["split"] = d["split"]
        if d.get("weight") is not None:
            source["weight"] = d["weight"]
        columns = d.get("columns") or []
        if len(columns) == 1:  # one column: the conversation
            source["fields"] = {columns[0]: "messages"}
        elif columns:
            out.notes.append((f"dataset_mixture {d['id']} columns",
                              f"{columns}: the format is detected from them (messages, "
                              "prompt/completion, …); set dataset.sources[].fields otherwise"))
        sources.append(source)
    out.put("dataset_mixture", "dataset.sources", sources)
    if value.get("seed") is not None:
        out.put("dataset_mixture.seed", "dataset.seed", value["seed"])
    if value.get("test_split_size") is not None:
        out.put("dataset_mixture.test_split_size", "dataset.test_split", value["test_split_size"])


def _chat_template(value: Any, recipe: dict[str, Any], out: Imported, file: str) -> None:
    out.chat_template = str(value)  # the command writes it to `file`
    out.put("chat_template", "patch_tokenizer.chat_template_file", file)


def _batch(recipe: dict[str, Any], out: Imported, gpus: int) -> None:
    micro = int(recipe["per_device_train_batch_size"])
    accumulation = int(recipe.get("gradient_accumulation_steps", 1))
    out.put("per_device_train_batch_size", "train.micro_batch_size", micro)
    out.put("gradient_accumulation_steps", "train.global_batch_size", micro * accumulation * gpus)
    out.put("--gpus", "train.nproc_per_node", gpus)
    out.notes.append(("gradient_accumulation_steps",
                      f"train.global_batch_size = {micro} × {accumulation} × {gpus} GPU(s) "
                      "(micro batch × accumulation × data-parallel size; `--gpus` sets the GPUs)"))


def _steps(recipe: dict[str, Any]) -> int | None:
    steps = recipe.get("max_steps")
    return int(steps) if steps is not None and int(steps) > 0 else None


def _max_steps(value: Any, recipe: dict[str, Any], out: Imported) -> None:
    if _steps(recipe) is None:
        out.skip("max_steps", f"{value}: the length comes from num_train_epochs")
    else:
        out.put("max_steps", "train.train_iters", _steps(recipe))


def _epochs(value: Any, recipe: dict[str, Any], out: Imported) -> None:
    if _steps(recipe) is not None:
        out.skip("num_train_epochs", "max_steps sets the length (it wins in TRL too)")
    else:
        out.put("num_train_epochs", "train.epochs", value)


def _warmup_ratio(value: Any, recipe: dict[str, Any], out: Imported) -> None:
    steps = _steps(recipe)
    if steps is None:
        out.skip("warmup_ratio", f"{value} of the steps, which are not known before the data is "
                 "tokenized (max_steps is not set): set train.lr_warmup_iters to "
                 f"{value} × the steps `rsft run` reports")
    else:
        out.put("warmup_ratio", "train.lr_warmup_iters", round(float(value) * steps))


def _scheduler(value: Any, recipe: dict[str, Any], out: Imported) -> None:
    style = DECAY_STYLES.get(str(value))
    if style is None:
        out.skip("lr_scheduler_type", f"{value}: the decay styles here are cosine, linear and "
                 "constant")
        return
    out.put("lr_scheduler_type", "train.lr_decay_style", style)
    kwargs = recipe.get("lr_scheduler_kwargs") or {}
    lr = float(recipe["learning_rate"])
    if "min_lr_rate" in kwargs:
        min_lr = float(f"{float(kwargs['min_lr_rate']) * lr:.10g}")  # no float noise in the YAML
        out.put("lr_scheduler_kwargs.min_lr_rate", "train.min_lr", min_lr)
    elif "min_lr" in kwargs:
        out.put("lr_scheduler_kwargs.min_lr", "train.min_lr", float(kwargs["min_lr"]))
    else:  # transformers' schedules decay to 0
        out.put("lr_scheduler_type", "train.min_lr", 0.0)
    for other in sorted(set(kwargs) - {"min_lr_rate", "min_lr"}):
        out.skip(f"lr_scheduler_kwargs.{other}", "no equivalent here")


def _precision(value: Any, recipe: dict[str, Any], out: Imported, key: str) -> None:
    if value:
        out.put(key, "train.precision", key)


def _push(value: Any, recipe: dict[str, Any], out: Imported) -> None:
    repo = recipe.get("hub_model_id")
    if not recipe.get("push_to_hub"):
        if repo:
            out.skip("hub_model_id", "push_to_hub is not true")
        return
    if not repo:
        out.skip("push_to_hub", "no hub_model_id: set export.push.repo to org/name")
        return
    out.put("hub_model_id", "export.push.repo", repo)


def _save_steps(value: Any, recipe: dict[str, Any], out: Imported) -> None:
    if recipe.get("save_strategy", "steps") != "steps":
        out.skip("save_steps", f"save_strategy is {recipe['save_strategy']!r}; checkpoints are "
                 "every train.save_interval steps and at the end")
    else:
        out.put("save_steps", "train.save_interval", int(value))


def _save_strategy(value: Any, recipe: dict[str, Any], out: Imported) -> None:
    if value != "steps":
        out.skip("save_strategy", f"{value!r}: checkpoints are every train.save_interval steps "
                 "and at the end")


def _report_to(value: Any, recipe: dict[str, Any], out: Imported) -> None:
    targets = [value] if isinstance(value, str) else list(value or [])
    targets = [t for t in targets if t not in ("none", None)]
    out.put("report_to", "train.report_to", targets)


def _seed(value: Any, recipe: dict[str, Any], out: Imported) -> None:
    out.put("seed", "train.seed", value)  # the trainer's seed: init, dropout, data order


def _handled_elsewhere(value: Any, recipe: dict[str, Any], out: Imported) -> None:
    """A key read together with the one that owns it (the revision with the model, the
    accumulation with the batch, the scheduler's kwargs with its type): nothing of its own."""


def rules(template_file: str) -> dict[str, Rule]:
    return {
        "model_name_or_path": _model,
        "output_dir": lambda v, r, o: o.put("output_dir", "workdir", v),
        "model_revision": _handled_elsewhere,
        "dataset_name": _dataset_name,
        "dataset_config": _handled_elsewhere,
        "dataset_configs": _handled_elsewhere,
        "dataset_train_split": _handled_elsewhere,
        "dataset_mixture": _mixture,
        "chat_template": lambda v, r, o: _chat_template(v, r, o, template_file),
        "per_device_train_batch_size": _handled_elsewhere,
        "gradient_accumulation_steps": _handled_elsewhere,
        "max_steps": _max_steps,
        "num_train_epochs": _epochs,
        "warmup_ratio": _warmup_ratio,
        "lr_scheduler_type": _handled_elsewhere,
        "lr_scheduler_kwargs": _handled_elsewhere,
        "bf16": lambda v, r, o: _precision(v, r, o, "bf16"),
        "fp16": lambda v, r, o: _precision(v, r, o, "fp16"),
        "gradient_checkpointing": lambda v, r, o: o.put("gradient_checkpointing",
                                                        "train.recompute", "full" if v else "none"),
        "push_to_hub": _push,
        "hub_model_id": _handled_elsewhere,
        "save_steps": _save_steps,
        "save_strategy": _save_strategy,
        "report_to": _report_to,
        "seed": _seed,
        "dataset_num_proc": lambda v, r, o: o.put("dataset_num_proc", "tokenize.workers", v),
    }


# TRL's SFTConfig defaults where ours differ: a recipe that leaves them out trains with these.
TRL_DEFAULTS = {"learning_rate": 2e-5, "per_device_train_batch_size": 8, "max_length": 1024,
                "num_train_epochs": 3, "lr_scheduler_type": "linear", "weight_decay": 0.0,
                "adam_beta2": 0.999, "warmup_steps": 0, "seed": 42}


def import_recipe(recipe: dict[str, Any], name: str, gpus: int = 1,
                  template_file: str = "chat_template.jinja") -> Imported:
    """Map an open-r1 SFT recipe (its YAML as a mapping) to our settings; `gpus`: the GPUs it
    runs on (open-r1 launches with accelerate on 8), for the global batch size; `template_file`:
    where the caller writes an inline chat template."""
    out = Imported()
    out.put("name", "name", name)
    implied = {k: v for k, v in TRL_DEFAULTS.items() if k not in recipe
               and not (k == "max_length" and "max_seq_length" in recipe)
               and not (k == "num_train_epochs" and _steps(recipe) is not None)
               and not (k == "warmup_steps" and "warmup_ratio" in recipe)}
    if implied:
        out.notes.append(("(unset)", "TRL's defaults written for " + ", ".join(
            f"{k}={v}" for k, v in implied.items())))
    recipe = {**implied, **recipe}
    table = rules(template_file)
    for key, value in recipe.items():
        leaf = normalise(key)
        alias = ALIASES.get(leaf)
        same_name = LEAVES.get(leaf, [])
        if leaf in table:
            table[leaf](value, recipe, out)
        elif leaf in NO_EQUIVALENT:
            out.skip(key, NO_EQUIVALENT[leaf])
        elif alias and not alias.note and "[]" not in alias.key:
            out.put(key, alias.key, value)
        elif alias:
            out.skip(key, alias.hint())
        elif len(same_name) == 1:
            out.put(key, same_name[0], value)
        else:
            out.skip(key, "no equivalent here")
    _batch(recipe, out, gpus)
    _scheduler(recipe["lr_scheduler_type"], recipe, out)
    out.settings = _in_model_order(out.settings, PipelineSettings)
    return out


def _in_model_order(data: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """Sections and keys in the order `rsft settings show` prints them."""
    ordered = {}
    for name, info in model.model_fields.items():
        if name not in data:
            continue
        nested = info.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel) and isinstance(data[name], dict):
            ordered[name] = _in_model_order(data[name], nested)
        else:
            ordered[name] = data[name]
    return ordered
