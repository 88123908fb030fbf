"""Other tools' names for our settings: TRL / transformers / open-r1 recipe keys and Megatron-LM
arguments, each with the key it corresponds to here and, where the meaning differs, how.

One table, used wherever an unknown key is reported (a YAML file, `--set`) and by
`rsft settings import-open-r1`. Keys that are spelled the same as one of ours in another
section (`lr` at the top level, `train.seq_length`) need no entry: `did_you_mean` finds them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from settings.models import PipelineSettings


@dataclass(frozen=True)
class Alias:
    key: str
    """Our dotted key (`[]` marks a list: one value per dataset source)."""
    note: str = ""
    """How the meaning differs, when it does."""

    def hint(self) -> str:
        return f"did you mean {self.key}?" + (f" ({self.note})" if self.note else "")


ALIASES: dict[str, Alias] = {
    # transformers TrainingArguments / TRL SFTConfig / open-r1 ScriptArguments
    "learning_rate": Alias("train.lr"),
    "max_length": Alias("tokenize.seq_length"),
    "max_seq_length": Alias("tokenize.seq_length"),
    "num_train_epochs": Alias("train.epochs"),
    "max_steps": Alias("train.train_iters"),
    "per_device_train_batch_size": Alias("train.micro_batch_size"),
    "gradient_accumulation_steps": Alias(
        "train.global_batch_size",
        "global_batch_size = micro_batch_size × accumulation steps × data-parallel size"),
    "warmup_ratio": Alias("train.lr_warmup_iters", "in steps: ratio × train.train_iters"),
    "warmup_steps": Alias("train.lr_warmup_iters"),
    "lr_scheduler_type": Alias(
        "train.lr_decay_style",
        "cosine, linear or constant; cosine_with_min_lr is cosine down to train.min_lr"),
    "lr_scheduler_kwargs": Alias("train.min_lr", "min_lr_rate × lr"),
    "max_grad_norm": Alias("train.clip_grad"),
    "adam_epsilon": Alias("train.adam_eps"),
    "bf16": Alias("train.precision", "precision: bf16"),
    "fp16": Alias("train.precision", "precision: fp16"),
    "torch_dtype": Alias("convert.dtype", "the checkpoint's dtype; train.precision is the "
                         "compute precision"),
    "gradient_checkpointing": Alias("train.recompute", "recompute: full"),
    "packing": Alias("tokenize.pack"),
    "save_steps": Alias("train.save_interval"),
    "save_total_limit": Alias("train.keep_last"),
    "logging_steps": Alias("train.log_interval"),
    "report_to": Alias("train.report_to"),
    "output_dir": Alias("workdir", "every stage's artifacts live under it"),
    "model_name_or_path": Alias("download.source", "hf://org/name@revision or a local folder"),
    "model_revision": Alias("download.source", "the @revision of hf://org/name@revision"),
    "chat_template": Alias("patch_tokenizer.chat_template_file", "a file holding the template"),
    "dataset_name": Alias("dataset.sources[].path", "as hf://org/name"),
    "dataset_config": Alias("dataset.sources[].name"),
    "dataset_train_split": Alias("dataset.sources[].split"),
    "dataset_mixture": Alias("dataset.sources", "a list of {path: hf://org/name, name, split, "
                             "weight, fields}"),
    "test_split_size": Alias("dataset.test_split"),
    "hub_model_id": Alias("export.push.repo"),
    "push_to_hub": Alias("export.push.repo", "set it to org/name to push"),
    "per_device_eval_batch_size": Alias("evaluate.batch_size"),
    # Megatron-LM arguments (`--tensor-model-parallel-size` and the like, dashes or underscores)
    "tensor_model_parallel_size": Alias("train.tensor_parallel"),
    "pipeline_model_parallel_size": Alias("train.pipeline_parallel"),
    "recompute_granularity": Alias("train.recompute"),
    "recompute_activations": Alias("train.recompute", "recompute: selective"),
    "lr_warmup_fraction": Alias("train.lr_warmup_iters", "in steps: fraction × train.train_iters"),
    "data_path": Alias("dataset.sources[].path", "raw records (JSONL, Parquet, hf://…): the "
                       "tokenize stage writes the indexed datasets"),
}


def _leaf_index(model: type[BaseModel], prefix: str = "",
                index: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Every field's name → the dotted keys that end in it (nested sections, not lists)."""
    index = {} if index is None else index
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        index.setdefault(name, []).append(path)
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            _leaf_index(info.annotation, f"{path}.", index)
    return index


LEAVES = _leaf_index(PipelineSettings)


def normalise(key: str) -> str:
    """`--tensor-model-parallel-size` and `Learning_Rate` → the table's spelling."""
    return key.strip().lstrip("-").replace("-", "_").lower()


def did_you_mean(loc: tuple[str | int, ...]) -> str | None:
    """A hint for an unknown key at `loc` (its path in the settings): the alias table's entry,
    else our keys of the same name in other sections."""
    if not loc or not isinstance(loc[-1], str):
        return None
    leaf = normalise(loc[-1])
    if leaf in ALIASES and ALIASES[leaf].key != ".".join(map(str, loc)):
        return ALIASES[leaf].hint()
    here = ".".join(map(str, loc))
    elsewhere = [k for k in LEAVES.get(leaf, []) if k != here]
    if len(elsewhere) == 1:
        return f"did you mean {elsewhere[0]}?"
    if elsewhere:
        return f"did you mean {', '.join(elsewhere[:-1])} or {elsewhere[-1]}?"
    return None
