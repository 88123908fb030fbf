"""Stage `evaluate`: lighteval scores of the exported model (and optionally of the base model),
hybrid-reasoning metrics, and the model card with the scores.

lighteval runs in its own process (`python -m tasks.evaluation`, killed whole on timeout) so a
vLLM engine or a model's memory never outlives the run. The base model's scores are cached under
a key of their own (the base artifact + the evaluation settings): retraining does not re-evaluate
the base.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from filelock import FileLock

from settings.errors import UserError
from settings.models import EvaluateSettings
from tasks import model_card
from tasks.artifacts import Manifest, compute_key
from tasks.stage import BuildContext, Stage, key_settings


def evaluate_model(settings: EvaluateSettings, model: Path, out: Path) -> dict[str, Any]:
    """Run lighteval on an HF folder into `out` (created); returns results.json's content.
    Raises UserError for a bad folder, task or backend."""
    from megatron_bridge.launch import run_command
    from tasks.evaluation.runner import EvalJob, check_model_folder, check_tasks, resolve_backend

    model, out = Path(model).resolve(), Path(out).resolve()
    job = EvalJob(evaluate=settings, model=str(model), output_dir=str(out),
                  backend=resolve_backend(settings.backend))
    check_model_folder(model)
    check_tasks(job.tasks)
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.json").write_text(job.model_dump_json(indent=2))
    run_command([sys.executable, "-m", "tasks.evaluation", str(out / "job.json")],
                "lighteval", out / "evaluate.log", settings.timeout_minutes * 60)
    return json.loads((out / "results.json").read_text())


def score_rows(results: dict[str, Any], base: dict[str, Any] | None) -> list[dict[str, Any]]:
    """task, metric, value, base, delta — one row per metric (stderr columns dropped)."""
    rows = []
    for task, metrics in results["scores"].items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr"):
                continue
            b = base["scores"].get(task, {}).get(metric) if base else None
            rows.append({"task": task, "metric": metric, "value": value, "base": b,
                         "delta": None if b is None else value - b})
    return rows


def hybrid_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"task": task, "mode": mode, **values}
            for task, modes in results["hybrid"].items() for mode, values in modes.items()]


def _base_results(ctx: BuildContext) -> dict[str, Any] | None:
    if not ctx.settings.evaluate_base:
        return None
    download = ctx.upstream["download"]
    key = compute_key({"base": download.key, "evaluate": key_settings(ctx.settings)})
    folder = ctx.store.scratch("evaluate", f"base-{key}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Several checkpoints' evaluations may start together: one scores the base, the others wait.
    with FileLock(folder.parent / f".base-{key}.lock"):
        if (folder / "results.json").is_file() and (folder / "done").is_file():
            ctx.log.info("evaluate: reusing the base model's scores from %s", folder)
            return json.loads((folder / "results.json").read_text())
        ctx.log.info("evaluate: scoring the base model %s", download.dir)
        results = evaluate_model(ctx.settings, download.dir, folder)
        (folder / "done").write_text("")
    return results


def build(ctx: BuildContext) -> None:
    export = ctx.upstream["export"]
    ctx.log.info("evaluate: lighteval on %s", export.dir)
    results = evaluate_model(ctx.settings, export.dir, ctx.out)
    base = _base_results(ctx)
    if base is not None:
        (ctx.out / "base_results.json").write_text(json.dumps(base, indent=2))
    rows = score_rows(results, base)
    (ctx.out / "scores.json").write_text(json.dumps(rows, indent=2))
    info = json.loads((export.dir / "model_card_info.json").read_text())
    (ctx.out / "model_card.md").write_text(model_card.render(info, info["iteration"], rows))
    for row in rows:
        ctx.log.info("evaluate: %s %s = %.4f", row["task"], row["metric"], row["value"])
    ctx.meta.update(backend=results["backend"], scores=results["scores"],
                    max_problems=results["max_problems"], iteration=info["iteration"])
    if lineage := export.meta.get("lineage"):
        log_scores(ctx.store.scratch("train", lineage), info["iteration"], rows, ctx.log)


def log_scores(run_folder: Path, iteration: int, rows: list[dict[str, Any]], log) -> bool:
    """Send one checkpoint's scores to the training run's trackers, at the checkpoint's step
    (`eval/<task>/<metric>`), once per evaluation built. `run_folder` is the training run's
    scratch folder, whose `job.json` holds the `train` settings the trackers are configured by
    (`megatron_bridge/training/tracking.py`, present when that module is installed). Returns
    whether anything was logged; a tracker failing never fails the evaluation."""
    job_path = run_folder / "job.json"
    if not job_path.is_file():
        return False
    from filelock import FileLock

    from megatron_bridge.training.job import TrainJob
    from megatron_bridge.training.tracking import open_trackers

    train = TrainJob.read(job_path).train
    if not train.report_to:
        return False
    values = {f"eval/{r['task']}/{r['metric']}": r["value"] for r in rows
              if isinstance(r["value"], (int, float))}
    try:
        # Evaluations of several checkpoints may finish together: one writer of the run at a time.
        with FileLock(run_folder / ".tracking.lock"):
            trackers = open_trackers(train, run_folder, train.tracking.run_name
                                     or f"rsft-{run_folder.name}", None)
            try:
                trackers.log(iteration, values)
            finally:
                trackers.close()
    except Exception as e:  # noqa: BLE001 - the scores are in the artifact; trackers are a view
        log.warning("evaluate: the trackers did not take the scores of step %d (%s: %s)",
                    iteration, type(e).__name__, e)
        return False
    return True


def report(manifest: Manifest) -> list[dict[str, Any]]:
    return json.loads((manifest.dir / "scores.json").read_text())


def markdown(manifest: Manifest) -> str:
    results = json.loads((manifest.dir / "results.json").read_text())
    partial = (f" on the first {results['max_problems']} problems of each task (partial scores)"
               if results["max_problems"] else "")
    lines = [f"### Evaluation (lighteval, {results['backend']} backend){partial}", "",
             *model_card.scores_table(report(manifest))]
    lines += ["", "#### Hybrid reasoning (per answer mode)", "",
              "| task | mode | samples | share | mean tokens | accuracy |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['mode']} | {r['samples']} | {r['share']:.2f} | "
              f"{r['mean_tokens']:.1f} | {r['accuracy']:.3f} |" for r in hybrid_rows(results)]
    return "\n".join(lines)


def gpus(settings: EvaluateSettings) -> int:
    import torch

    from tasks.evaluation.runner import resolve_backend

    try:
        backend = resolve_backend(settings.backend)
    except UserError:
        return 0  # the build refuses it in one line
    if backend == "vllm":
        return settings.vllm.tensor_parallel * settings.vllm.data_parallel
    return 1 if torch.cuda.is_available() else 0


STAGE = Stage(
    name="evaluate", version="2", settings=lambda s: s.evaluate, build=build,
    upstream=("export", "download"), report=report, markdown=markdown, gpus=gpus,
    description="lighteval scores (+ base delta) and hybrid-reasoning metrics",
)
