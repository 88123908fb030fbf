"""Run names that say what an experiment changed: `<preset>-<short diff>`, e.g. `tiny-lr2e-5-iters20`
for the tiny preset with `train.lr=2e-5` and `train.train_iters=20`.

The diff compares every leaf setting with the preset the settings are named after (`name`), so it
is the same whether the change came from `--set`, a YAML file or a deployment's parameters.
Each changed leaf becomes one token (an abbreviation + its value); the best-known knobs come first
so a capped name keeps the ones people look for; a capped diff ends in a hash of the whole diff,
so two experiments never share a name.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import ValidationError

from settings.errors import UserError
from settings.models import PipelineSettings

ABBREVIATIONS = {
    # in the order they appear in a name: the knobs an experiment usually turns first
    "train.lr": "lr", "train.train_iters": "iters", "train.global_batch_size": "gbs",
    "train.micro_batch_size": "mbs", "tokenize.seq_length": "seq", "train.min_lr": "minlr",
    "train.lr_warmup_iters": "warmup", "train.lr_decay_style": "decay",
    "train.weight_decay": "wd", "train.clip_grad": "clip", "train.precision": "",
    "train.tensor_parallel": "tp", "train.pipeline_parallel": "pp",
    "train.nproc_per_node": "procs", "train.nnodes": "nodes", "train.seed": "seed",
    "train.use_distributed_optimizer": "distopt", "train.recompute": "recompute",
    "train.save_interval": "save", "train.keep_last": "keep", "train.adam_beta1": "b1",
    "train.adam_beta2": "b2", "train.adam_eps": "eps", "train.device": "",
    "download.source": "model", "dataset.sources": "data", "dataset.test_split": "test",
    "dataset.seed": "dataseed", "dataset.hybrid.enabled": "hybrid",
    "dataset.hybrid.ratio": "hybrid", "tokenize.pack": "pack", "tokenize.overlong": "overlong",
    "tokenize.assistant_turns": "turns", "convert.tensor_parallel": "ctp",
    "convert.pipeline_parallel": "cpp", "convert.dtype": "cdtype",
    "patch_tokenizer.renames": "renames", "export.iteration": "export",
    "evaluate.tasks": "tasks", "evaluate.max_problems": "problems",
    "evaluate.max_new_tokens": "gen", "evaluate.temperature": "temp",
}
IGNORED = {"name", "workdir"}
"""Not an experiment: which configuration it is, and where its artifacts live."""
MAX_DIFF = 48
"""Characters of the diff part of a name (before the hash that marks a capped one)."""


def leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1e-3}}` → `{"train.lr": 1e-3}`; lists are leaves."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in ABBREVIATIONS:
            out.update(leaves(value, path + "."))
        else:
            out[path] = value
    return out


def preset_settings(name: str) -> PipelineSettings | None:
    """The preset called `name`, or None when there is no such (valid) preset."""
    from settings.loader import PRESETS_DIR, read_yaml

    path = PRESETS_DIR / f"{name}.yaml"
    if not re.fullmatch(r"[\w.\-]+", name) or not path.is_file():
        return None
    try:
        return PipelineSettings.model_validate(read_yaml(path))
    except (UserError, ValidationError):
        return None


def _number(value: float) -> str:
    """The shorter of `0.5` and `3e-4` forms (no `e-05` padding)."""
    if isinstance(value, int):
        return str(value)
    mantissa, exponent = f"{value:e}".split("e")
    scientific = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    plain = f"{value:g}"
    return scientific if len(scientific) < len(plain) or "e" in plain else plain


def token(path: str, value: Any) -> str:
    """One changed leaf as a short token: `lr2e-5`, `iters20`, `nopack`, `bf16`, `datac1f3`."""
    name = ABBREVIATIONS.get(path, path.rsplit(".", 1)[-1].replace("_", ""))
    if isinstance(value, bool):
        return name if value else f"no{name}"
    if isinstance(value, (int, float)):
        return f"{name}{_number(value)}"
    if value is None:
        return f"{name}none"
    if isinstance(value, str):
        return name + re.sub(r"[^a-z0-9.]+", "-", value.lower()).strip("-")[:20]
    # a list or mapping (data sources, tasks): its name and a short hash of its content
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:4]
    return f"{name}{digest}"


def diff_tokens(settings: PipelineSettings, base: PipelineSettings) -> list[str]:
    """The tokens of every leaf that differs from `base`, best-known knobs first."""
    mine = leaves(settings.model_dump(mode="json"))
    theirs = leaves(base.model_dump(mode="json"))
    changed = [p for p in mine if p not in IGNORED and mine[p] != theirs.get(p)]
    order = list(ABBREVIATIONS)
    changed.sort(key=lambda p: order.index(p) if p in order else len(order))  # stable: model order
    return [token(p, mine[p]) for p in changed]


def short_diff(settings: PipelineSettings) -> str:
    """What these settings change from the preset they are named after ("" when nothing, or when
    `name` is no preset), capped at MAX_DIFF characters plus a hash of the whole diff."""
    base = preset_settings(settings.name)
    if base is None:
        return ""
    tokens = diff_tokens(settings, base)
    diff = "-".join(tokens)
    if len(diff) <= MAX_DIFF:
        return diff
    kept: list[str] = []
    for t in tokens:
        if len("-".join([*kept, t])) > MAX_DIFF:
            break
        kept.append(t)
    digest = hashlib.sha256(diff.encode()).hexdigest()[:4]
    return "-".join([*kept, f"etc{digest}"])


def run_label(settings: PipelineSettings) -> str:
    """`<name>` or `<name>-<short diff>`: the start of a flow run's name."""
    name = re.sub(r"[/%&<>\s]+", "-", settings.name)  # characters Prefect refuses in names
    return "-".join(p for p in (name, short_diff(settings)) if p)
