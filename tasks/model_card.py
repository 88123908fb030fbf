"""The exported model's card (`README.md`): where it came from, how it was trained, how it scores,
and the artifact keys that produced it (lineage). Facts come from the upstream manifests."""

from __future__ import annotations

from typing import Any

from tasks.artifacts import Manifest

TRAIN_KEYS = ("train_iters", "global_batch_size", "micro_batch_size", "lr", "min_lr",
              "lr_warmup_iters", "lr_decay_style", "weight_decay", "clip_grad", "precision",
              "tensor_parallel", "pipeline_parallel")


def lineage(upstream: dict[str, Manifest]) -> dict[str, Any]:
    """What the card states, read from the upstream manifests (kept in the export's meta)."""
    download, dataset, train = upstream["download"], upstream["dataset"], upstream["train"]
    base = download.meta.get("repo") or download.meta.get("source") or download.meta.get("local_dir")
    return {
        "base_model": base,
        "base_revision": download.meta.get("commit"),
        "sources": [{"path": s["path"], "weight": s.get("weight", 1.0)}
                    for s in dataset.key_material["settings"]["sources"]],
        "train_rows": dataset.meta.get("train"), "test_rows": dataset.meta.get("test"),
        "settings": {k: train.key_material["settings"][k] for k in TRAIN_KEYS
                     if k in train.key_material["settings"]},
        "steps": train.meta.get("iterations"), "final_loss": train.meta.get("final_loss"),
        "final_val_loss": train.meta.get("final_val_loss"),
        "final_val_tokens": train.meta.get("final_val_tokens"),
        "keys": {name: m.key for name, m in sorted(upstream.items())},
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
    lines += [f"- {_count(info['train_rows'])} training rows, {_count(info['test_rows'])} held out",
              "", "## Training", "",
              f"{info['steps']} steps (exported: iteration {iteration}), final loss "
              f"{info['final_loss']:.4f}." if info["final_loss"] is not None else ""]
    if info.get("final_val_loss") is not None:  # train.eval_interval was on
        lines += ["", f"Final validation loss (per supervised token of the held-out test split, "
                      f"{info['final_val_tokens']} tokens): {info['final_val_loss']:.4f}."]
    lines += ["",
              "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info["settings"].items()]
    if scores:
        lines += ["", "## Evaluation (lighteval)", "", *scores_table(scores)]
    lines += ["", "## Lineage", "", "Artifact keys (`rsft` content-addressed store) this model was "
              "built from:", ""]
    lines += [f"- {stage}: `{key}`" for stage, key in info["keys"].items()]
    return "\n".join(lines) + "\n"
