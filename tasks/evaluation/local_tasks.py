"""Offline copies of lighteval's MATH-500 and AIME 2024 tasks: lighteval's own prompt functions
and metrics, reading the files shipped in `examples/eval` instead of the Hub."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType

EVAL_DATA = Path(__file__).resolve().parents[2] / "examples" / "eval"

# local name → (lighteval module, config attribute, data folder)
LOCAL_TASKS = {
    "math_500_local": ("lighteval.tasks.tasks.math_500", "math_500", "math500"),
    "aime24_local": ("lighteval.tasks.tasks.aime", "aime24", "aime24"),
}


def local_task(name: str, samples: int):
    """lighteval's config for the built-in task, pointed at the shipped data, with pass@1
    estimated over `samples` samples per problem."""
    import importlib

    from lighteval.metrics.metrics import Metrics

    module, attr, folder = LOCAL_TASKS[name]
    builtin = getattr(importlib.import_module(module), attr)
    return dataclasses.replace(
        builtin, name=name, hf_repo=str(EVAL_DATA / folder), hf_subset="default",
        hf_revision=None, metrics=[Metrics.pass_at_k_math(sample_params={"k": 1, "n": samples})])


def tasks_module(tasks: dict[str, int]) -> ModuleType:
    """A custom-tasks module (lighteval's `TASKS_TABLE` convention) for the local tasks asked."""
    module = ModuleType("rsft_local_tasks")
    module.TASKS_TABLE = [local_task(n, s) for n, s in tasks.items() if n in LOCAL_TASKS]
    return module
