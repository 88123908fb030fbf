"""What `rsft run` prints at the end: where the run got to and what to do next.

Final train (and validation) loss, the evaluation scores, the export folder's full path, and the
commands that make sense from there — for a completed, a partial (`--until`, `--only`) or a
failed run alike: the facts come from the artifact store (the same keys the run planned), so a
failed run still shows what it built and where its training stopped. Plain lines, never wrapped
or cut, so paths can be copied whatever the terminal's width.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from flows.selection import Selection
from settings.models import PipelineSettings
from tasks.agent_watch import recent_metrics
from tasks.artifacts import ArtifactStore, Manifest
from tasks.train import final_losses

INDENT = " " * 10


def built_artifacts(settings: PipelineSettings, selection: Selection) -> dict[str, Manifest]:
    """The planned stages' artifacts that exist and are intact (sizes checked)."""
    from flows.pipeline import plan_pipeline

    store = ArtifactStore(Path(settings.workdir).resolve())
    found = {}
    for p in plan_pipeline(settings, selection):
        manifest, _ = store.check(p.name, p.plan.key)
        if manifest is not None:
            found[p.name] = manifest
    return found


def command(config: str | None, overrides: list[str], *extra: str) -> str:
    """`rsft run [CONFIG] [--set K=V …] EXTRA…`, quoted for a POSIX shell."""
    args = ["rsft", "run", *([config] if config else [])]
    for o in overrides:
        args += ["--set", o]
    return shlex.join([*args, *extra])


def summary(settings: PipelineSettings, selection: Selection, manifests: dict[str, Manifest],
            config: str | None, overrides: list[str], run_name: str | None = None,
            failed: bool = False) -> list[str]:
    """The end-of-run lines. `manifests`: the stages the run returned (completed run) or found
    in the store (`built_artifacts`, failed run)."""
    store = ArtifactStore(Path(settings.workdir).resolve())
    run = f"run {run_name}" if run_name else "run"
    lines = [f"{run}: {'failed' if failed else 'completed'}"]
    nexts: list[str] = []
    lines += _train(settings, selection, manifests, store)
    if evaluate := manifests.get("evaluate"):
        lines += _scores(evaluate)
    export = manifests.get("export")
    if export is not None:
        lines.append(f"{'export':<10}{export.dir}")
    if failed:
        resumes = ", training resumes from its latest checkpoint" if (
            "train" not in manifests and any(ln.startswith("train") for ln in lines)) else ""
        nexts.append(f"{_rerun(config, overrides, selection)}   # after fixing the error: built "
                     f"stages are reused{resumes}")
    elif selection.until or selection.only:
        nexts.append(f"{command(config, overrides)}   # the rest of the pipeline (built stages "
                     "are reused)")
    if export is not None:
        nexts += _export_next(settings, export, manifests, config, overrides, store)
    if nexts:
        lines += ["next:", *(f"  {n}" for n in nexts)]
    return lines


def _train(settings: PipelineSettings, selection: Selection, manifests: dict[str, Manifest],
           store: ArtifactStore) -> list[str]:
    if train := manifests.get("train"):
        metrics = [json.loads(x) for x in (train.dir / "metrics.jsonl").read_text().splitlines()]
        return [f"{'train':<10}{_losses(final_losses(metrics))}"]
    # not built: a failed or stopped training run leaves its records and checkpoints in scratch
    from flows.pipeline import plan_pipeline
    from megatron_bridge import checkpoint

    planned = {p.name: p for p in plan_pipeline(settings, selection)}
    if "train" not in planned:
        return []
    scratch = store.scratch("train", planned["train"].plan.scratch)
    records = recent_metrics(scratch / "metrics.jsonl", 1)
    if not records:
        return []
    kept = checkpoint.available_iterations(scratch / "checkpoints")
    line = (f"{'train':<10}stopped at step {records[-1]['step']}/{planned['train'].section.train_iters} "
            f"(loss {records[-1]['loss']:.4f}); log {scratch / 'train.log'}")
    resume = (f"the rerun resumes from iteration {kept[-1]}" if kept
              else "no checkpoint yet: the rerun starts over")
    return [line, f"{INDENT}{resume}"]


def _losses(losses: dict) -> str:
    text = f"loss {losses['loss']:.4f} at step {losses['step']}"
    if losses["first_loss"] is not None:
        text += f" (from {losses['first_loss']:.4f})"
    if losses["val_loss"] is not None:
        text += f", validation loss {losses['val_loss']:.4f} at step {losses['val_step']}"
    return text


def _scores(evaluate: Manifest) -> list[str]:
    results = json.loads((evaluate.dir / "results.json").read_text())
    rows = json.loads((evaluate.dir / "scores.json").read_text())
    partial = (f" (first {results['max_problems']} problems of each task)"
               if results.get("max_problems") else "")
    lines = []
    for i, row in enumerate(rows):
        base = (f" (base {row['base']:.4f}, delta {row['delta']:+.4f})"
                if row.get("base") is not None else "")
        lines.append(f"{'scores' if i == 0 else '':<10}{row['task']} {row['metric']} = "
                     f"{row['value']:.4f}{base}{partial if i == 0 else ''}")
    return lines


def _export_next(settings: PipelineSettings, export: Manifest, manifests: dict[str, Manifest],
                 config: str | None, overrides: list[str], store: ArtifactStore) -> list[str]:
    from megatron_bridge import checkpoint

    folder = str(export.dir)
    evaluate = ["rsft", "eval", "--model", folder, "--out", f"eval-{export.key[:8]}"]
    if config:
        evaluate += ["--preset", config]
    for o in overrides:  # the run's evaluate settings (`rsft eval` takes the same keys)
        if o.startswith("evaluate."):
            evaluate += ["--set", o]
    if "evaluate" in manifests and settings.evaluate.max_problems:
        evaluate += ["--set", "evaluate.max_problems=null"]
        why = "score every problem"
    else:
        why = "score the exported model"
    lines = [f"{shlex.join(evaluate)}   # {why}"]
    iteration = export.meta.get("iteration")
    if train := manifests.get("train"):
        scratch = store.scratch("train", train.meta.get("lineage", train.key)) / "checkpoints"
        earlier = [i for i in checkpoint.available_iterations(scratch) if i != iteration]
        if earlier:
            other = command(config, overrides, "--from", "export", "--set",
                            f"export.iteration={earlier[-1]}")
            lines.append(f"{other}   # export (and score) another kept checkpoint: "
                         f"{', '.join(map(str, earlier))}")
    load = ("import sys; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "model = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])")
    lines.append(f'python -c "{load}" {shlex.quote(folder)}   # load it with transformers')
    return lines


def _rerun(config: str | None, overrides: list[str], selection: Selection) -> str:
    extra: list[str] = []
    if selection.from_stage:
        extra += ["--from", selection.from_stage]
    for stage in selection.only:
        extra += ["--only", stage]
    if selection.until:
        extra += ["--until", selection.until]
    for stage in selection.force:
        extra += ["--force", stage]
    return command(config, overrides, *extra)
