"""The exported model's card (`README.md`): where it came from, how it was trained, how it scores,
and the artifact keys that produced it (lineage). Facts come from the upstream manifests."""

from __future__ import annotations

from typing import Any

from megatron_bridge.training.job import read_metrics
from tasks.artifacts import Manifest

TRAIN_KEYS = ("global_batch_size", "micro_batch_size", "lr", "min_lr", "lr_warmup_iters",
              "lr_decay_style", "lr_decay_iters", "weight_decay", "clip_grad", "precision",
              "tensor_parallel", "pipeline_parallel")


def _losses_at(train: Manifest, iteration: int) -> dict[str, Any]:
    """The last logged train loss and validation loss at or before `iteration`, with their steps
    (from metrics.jsonl)."""
    path = train.dir / "metrics.jsonl"
    records = read_metrics(path) if path.is_file() else []
    logged = [r for r in records if r["step"] <= iteration and r.get("loss") is not None]
    val = [r for r in records if r["step"] <= iteration and r.get("val_loss") is not None]
    return {"loss_step": logged[-1]["step"] if logged else None,
            "loss": logged[-1]["loss"] if logged else None,
            "val_step": val[-1]["step"] if val else None,
            "val_loss": val[-1]["val_loss"] if val else None,
            "val_tokens": val[-1].get("val_tokens") if val else None}


def lineage(upstream: dict[str, Manifest], iteration: int) -> dict[str, Any]:
    """What the card states about checkpoint `iteration` of the training run, read from the
    upstream manifests (kept in the export's meta). Only what that checkpoint is: the same
    checkpoint reached by a longer run of the same lineage gets the same card."""
    download, dataset, train = upstream["download"], upstream["dataset"], upstream["train"]
    base = download.meta.get("repo") or download.meta.get("source") or download.meta.get("local_dir")
    settings = dict(train.key_material["settings"])
    settings["lr_decay_iters"] = train.meta.get("decay_iters", settings.get("lr_decay_iters"))
    run = train.meta.get("lineage", train.key)
    return {
        "base_model": base,
        "base_revision": download.meta.get("commit"),
        "sources": [{"path": s["path"], "weight": s.get("weight", 1.0)}
                    for s in dataset.key_material["settings"]["sources"]],
        "train_rows": dataset.meta.get("train"), "test_rows": dataset.meta.get("test"),
        "settings": {k: settings[k] for k in TRAIN_KEYS if k in settings},
        "iteration": iteration, **_losses_at(train, iteration), "run": run,
        "keys": {name: f"{run}@{iteration}" if name == "train" else m.key
                 for name, m in sorted(upstream.items())},
    }


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def scores_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of a task/metric/value/base/delta table."""
    return ["| task | metric | value | base | delta |", "|---|---|---|---|---|"] + [
        f"| {r['task']} | {r['metric']} | {_num(r['value'], '.4f')} | {_num(r['base'], '.4f')} | "
        f"{_num(r['delta'], '+.4f')} |" for r in rows]


def _count(value: Any) -> str:
    return str(value.get("rows", value)) if isinstance(value, dict) else str(value)


def render(info: dict[str, Any], iteration: int, scores: list[dict[str, Any]] | None = None) -> str:
    base = info["base_model"]
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [reasoning, sft, megatron-core, rsft]"]
    if base and "/" in base and not base.startswith(("/", "builtin:")):
        front.append(f"base_model: {base}")
    lines = [*front, "---", "", f"# Fine-tuned from {base}", "",
             "Supervised fine-tuning of a reasoning model with megatron-core (reasoning-sft). "
             "Answers open with `<think>` (full reasoning) or `<short>` (direct answer); "
             "generation stops at the chat template's end token.", "",
             "## Base model", "", f"- `{base}`" + (f" at revision `{info['base_revision']}`"
                                                   if info["base_revision"] else ""), "",
             "## Data", ""]
    lines += [f"- `{s['path']}` (weight {s['weight']})" for s in info["sources"]]
    loss = (f"; loss {info['loss']:.4f} at step {info['loss_step']}"
            if info.get("loss") is not None else "")
    lines += [f"- {_count(info['train_rows'])} training rows, {_count(info['test_rows'])} held out",
              "", "## Training", "",
              f"Checkpoint of iteration {iteration} (training run `{info['run']}`){loss}."]
    if info.get("val_loss") is not None:  # train.eval_interval was on
        lines += ["", f"Validation loss at step {info['val_step']} (per supervised token of the "
                      f"held-out test split, {info['val_tokens']} tokens): {info['val_loss']:.4f}."]
    lines += ["", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info["settings"].items()]
    if scores:
        lines += ["", "## Evaluation (lighteval)", "", *scores_table(scores)]
    lines += ["", "## Lineage", "", "Artifact keys (`rsft` content-addressed store) this model was "
              "built from (train: the training run and iteration):", ""]
    lines += [f"- {stage}: `{key}`" for stage, key in info["keys"].items()]
    return "\n".join(lines) + "\n"
