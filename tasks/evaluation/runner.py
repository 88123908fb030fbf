"""Run lighteval on an HF model folder: checks first (one line each), then lighteval's Pipeline
with the transformers (any device) or vLLM (GPU) backend, then results + details + hybrid metrics
written into an output folder.

Offline traps handled here: lighteval's task registry imports every built-in task
module and some fetch files at import, so a run of only local tasks builds its registry from those
alone, and a run with built-in tasks skips the modules that cannot be imported; predictions are
cached in a fresh folder per run (lighteval's cache key ignores the weights); sampling is switched
on (lighteval's transformers backend never sets `do_sample`).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from settings.errors import UserError, exit_on_user_error
from settings.models import EvaluateSettings
from tasks.evaluation.local_tasks import LOCAL_TASKS, tasks_module

log = logging.getLogger("rsft.evaluate")

# open-r1's evaluation suite (its README); others work too if lighteval has them.
OPEN_R1_TASKS = ("aime24", "math_500", "gpqa:diamond", "lcb:codegeneration")



class EvalJob(BaseModel):
    """Everything one lighteval run needs (written as JSON for the subprocess): the `evaluate`
    settings whole, plus what they cannot know."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    evaluate: EvaluateSettings
    model: str
    """The HF model folder (or, in tests, a name for a ready LightevalModel)."""
    output_dir: str
    backend: Literal["transformers", "vllm"]
    """What `evaluate.backend` resolved to on the machine that wrote the job."""

    @model_validator(mode="after")
    def _backend_resolves_the_setting(self) -> "EvalJob":
        if self.evaluate.backend not in ("auto", self.backend):
            raise ValueError(f"backend {self.backend} contradicts evaluate.backend "
                             f"{self.evaluate.backend}")
        return self

    @property
    def tasks(self) -> dict[str, int]:
        """Task name → samples per problem."""
        return {t.name: t.samples for t in self.evaluate.tasks}


def resolve_backend(backend: str) -> str:
    import torch

    cuda = torch.cuda.is_available()
    if backend == "auto":
        return "vllm" if cuda and importlib.util.find_spec("vllm") else "transformers"
    if backend == "vllm":
        if not cuda:
            raise UserError("evaluate.backend vllm needs a CUDA GPU and none is visible; use "
                            "backend: transformers (or auto)")
        if not importlib.util.find_spec("vllm"):
            raise UserError("evaluate.backend vllm: vllm is not installed; pip install -e '.[gpu]'")
    return backend


def check_model_folder(path: Path) -> None:
    """An HF folder lighteval can load, tokenize and prompt with a chat template."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model folder (no config.json); export one "
                        "with `rsft run --until export` or `rsft convert mcore2hf`")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                "vocab.json", "tokenizer.model")):
        raise UserError(f"{path} has no tokenizer files (tokenizer.json / tokenizer_config.json); "
                        "copy the patched tokenizer in (`rsft convert mcore2hf --hf-base`)")
    config = path / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    if not template and not (path / "chat_template.jinja").is_file():
        raise UserError(f"{path} has no chat template (tokenizer_config.json chat_template or "
                        "chat_template.jinja): a reasoning model would be prompted as plain text; "
                        "copy the patched tokenizer in")


def check_tasks(tasks: dict[str, int]) -> None:
    """Task names are checked against lighteval when the registry is built; only obviously
    malformed ones are refused here."""
    for name in tasks:
        if not name or any(c in name for c in "|@, "):
            raise UserError(f"evaluate.tasks: '{name}' is not a task name (give the name, e.g. "
                            "aime24; samples go in `samples`)")


def _builtin_configs() -> dict[str, Any]:
    """lighteval's built-in task configs, skipping modules that fail to import offline."""
    import lighteval.tasks.tasks as builtin
    from lighteval.tasks.registry import Registry

    root = Path(list(builtin.__path__)[0])
    modules = [f"lighteval.tasks.tasks.{f.stem}" for f in root.glob("*.py") if f.stem != "__init__"]
    modules += [f"lighteval.tasks.tasks.{d.name}.main" for d in root.iterdir()
                if d.is_dir() and (d / "main.py").is_file()]
    configs: dict[str, Any] = {}
    for name in sorted(modules):
        try:
            configs.update(Registry._extract_configs(importlib.import_module(name)))
        except Exception as e:  # e.g. a module downloading a file at import, offline
            log.info("lighteval task module %s skipped: %s", name, str(e).splitlines()[0][:120])
    return configs


@contextmanager
def task_registry(tasks: dict[str, int], max_new_tokens: int):
    """lighteval's registry limited to what the run needs (see the module docstring), with every
    task's generation budget set to `max_new_tokens` (the transformers backend reads the task's
    `generation_size`, not the model's generation parameters)."""
    from lighteval.tasks.registry import Registry

    builtins = [n for n in tasks if n not in LOCAL_TASKS]
    original = Registry.load_all_task_configs
    configs = _builtin_configs() if builtins else {}
    if unknown := [n for n in builtins if n not in configs]:
        raise UserError(f"evaluate.tasks: unknown task {', '.join(map(repr, unknown))}; local tasks: "
                        f"{', '.join(LOCAL_TASKS)}; lighteval's: `lighteval tasks list` "
                        f"(open-r1 uses {', '.join(OPEN_R1_TASKS)})")

    def load(custom_tasks=None, load_multilingual=False):
        found = dict(configs)
        if custom_tasks is not None:
            found.update(Registry._extract_configs(Registry.create_custom_tasks_module(custom_tasks)))
        return {name: dataclasses.replace(config, generation_size=max_new_tokens)
                if name in tasks else config for name, config in found.items()}

    Registry.load_all_task_configs = staticmethod(load)
    try:
        yield ",".join(n if n in LOCAL_TASKS else f"{n}@n={s}" for n, s in tasks.items())
    finally:
        Registry.load_all_task_configs = original


def model_config(job: EvalJob, cache_dir: Path):
    from lighteval.models.model_input import GenerationParameters

    e = job.evaluate
    generation = GenerationParameters(temperature=e.temperature, top_p=e.top_p,
                                      max_new_tokens=e.max_new_tokens, seed=e.seed)
    if job.backend == "vllm":
        from lighteval.models.vllm.vllm_model import VLLMModelConfig

        v = e.vllm
        return VLLMModelConfig(
            model_name=job.model, dtype=v.dtype, max_model_length=v.max_model_length, seed=e.seed,
            gpu_memory_utilization=v.gpu_memory_utilization, tensor_parallel_size=v.tensor_parallel,
            data_parallel_size=v.data_parallel, add_special_tokens=False,
            generation_parameters=generation, cache_dir=str(cache_dir))
    import torch
    from lighteval.models.transformers.transformers_model import TransformersModelConfig

    # The chat template already starts with BOS: adding special tokens would double it.
    return TransformersModelConfig(
        model_name=job.model, device="cuda" if torch.cuda.is_available() else "cpu",
        batch_size=e.batch_size, add_special_tokens=False, generation_parameters=generation,
        cache_dir=str(cache_dir))


@contextmanager
def _beside(folder: Path | None):
    """Work from the model's parent and name the model relatively: lighteval puts its prediction
    cache at `cache_dir / model_name`, which for an absolute model path is inside the model
    folder itself (an artifact that must not change)."""
    if folder is None:
        yield None
        return
    cwd = Path.cwd()
    os.chdir(folder.parent)
    try:
        yield folder.name
    finally:
        os.chdir(cwd)


def run(job: EvalJob, model=None) -> dict[str, Any]:
    """Evaluate; write `results.json` (scores and hybrid metrics), `details/<task>.parquet` and
    lighteval's own outputs under `lighteval/` into `job.output_dir`. `model` replaces the model
    folder by a ready LightevalModel (used by the tests' answer models)."""
    import torch

    grad = torch.is_grad_enabled()
    try:
        return _run(job, model)
    finally:  # importing lighteval's transformers backend turns autograd off process-wide
        torch.set_grad_enabled(grad)


def _run(job: EvalJob, model) -> dict[str, Any]:
    from lighteval.logging.evaluation_tracker import EvaluationTracker
    from lighteval.pipeline import ParallelismManager, Pipeline, PipelineParameters

    from tasks.evaluation.hybrid import hybrid_metrics, sample_scorer

    check_tasks(job.tasks)
    out = Path(job.output_dir).resolve()
    raw = out / "lighteval"
    launcher = ParallelismManager.VLLM if job.backend == "vllm" else ParallelismManager.ACCELERATE
    folder = None if model is not None else Path(job.model).resolve()
    if folder is not None:
        check_model_folder(folder)
    with task_registry(job.tasks, job.evaluate.max_new_tokens) as task_string, \
            tempfile.TemporaryDirectory(prefix=".predictions-", dir=out) as cache, \
            _beside(folder) as model_name:
        if model_name is not None:
            job = job.model_copy(update={"model": model_name})
        tracker = EvaluationTracker(output_dir=str(raw), save_details=True)
        params = PipelineParameters(launcher_type=launcher,
                                    custom_tasks_directory=tasks_module(job.tasks),
                                    max_samples=job.evaluate.max_problems)
        pipeline = Pipeline(tasks=task_string, pipeline_parameters=params, evaluation_tracker=tracker,
                            model_config=None if model else model_config(job, Path(cache)), model=model)
        generator = getattr(pipeline.model, "model", None)
        if (job.backend == "transformers" and job.evaluate.temperature > 0
                and generator is not None):
            # lighteval passes temperature/top_p but never do_sample: without it transformers
            # decodes greedily (n identical samples) unless the folder's generation_config says so
            generator.generation_config.do_sample = True
        # lighteval seeds `random` and numpy only; sampling draws from torch's generator, so an
        # unseeded run scores differently each time (found by the crash drills' reruns)
        from transformers import set_seed

        set_seed(job.evaluate.seed)
        pipeline.evaluate()
        pipeline.save_and_push_results()
        configs = {t.config.name: t.config for t in pipeline.tasks_dict.values()}
    results = pipeline.get_results()["results"]
    # lighteval names results `task:fewshots`
    scores = {re.sub(r"[|:]\d+$", "", name): {k: float(v) for k, v in metrics.items()}
              for name, metrics in results.items() if name != "all"}
    details = out / "details"
    details.mkdir(exist_ok=True)
    hybrid = {}
    for name, config in configs.items():
        found = glob.glob(str(raw / "details" / "**" / f"details_{name}|*.parquet"), recursive=True)
        if not found:
            continue
        target = details / f"{name.replace(':', '_')}.parquet"
        shutil.move(found[0], target)
        hybrid[name] = hybrid_metrics(target, sample_scorer(config))
    shutil.rmtree(raw / "details", ignore_errors=True)  # moved above; lighteval's JSON stays
    # lighteval returns tasks in no fixed order: keep the order they were asked in
    order = {name: i for i, name in enumerate(job.tasks)}

    def ordered(d: dict) -> dict:
        return {k: d[k] for k in sorted(d, key=lambda k: (order.get(k, len(order)), k))}

    summary = {"model": str(folder or job.model), "backend": job.backend, "tasks": job.tasks,
               "max_problems": job.evaluate.max_problems, "scores": ordered(scores),
               "hybrid": ordered(hybrid)}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m tasks.evaluation JOB.json", file=sys.stderr)
        return 2
    job = EvalJob.model_validate_json(Path(args[0]).read_text())
    if all(n in LOCAL_TASKS for n in job.tasks):  # nothing to fetch: never wait on the network
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    def work() -> None:
        resolve_backend(job.backend)  # this machine can run it too (vLLM: a GPU, the package)
        print(json.dumps(run(job)["scores"]))

    return exit_on_user_error(work)
