"""Stage `train`: megatron-core SFT under torchrun, launched and watched from here.

The job (`megatron_bridge/training/job.py`) is written into the stage's scratch folder
`<workdir>/scratch/train/<lineage>/`, which also holds the checkpoints. It is keyed by the
training run's *lineage* — the artifact's key material without the run's length and checkpoint
cadence, plus the learning-rate decay horizon — so a rerun (after a crash, a kill, a timeout)
resumes from the latest checkpoint there, and a longer run of the same lineage continues the
shorter one (Megatron-LM's way of extending a run: raise `train_iters`, keep `lr_decay_iters`).
One run trains in a lineage's folder at a time (a file lock). torchrun runs in its own process group with its own timeout; rank-0 lines go to the Prefect
log, every line to `train.log`; per-step metrics (JSON lines) feed a progress artifact while it
runs. The artifact is the final checkpoint (Megatron layout, loadable by `rsft convert mcore2hf`)
with `metrics.jsonl`, `loss.png` and the log.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from settings.models import TrainSettings
from tasks import train_launch
from tasks.agent_watch import latest_metrics
from tasks.artifacts import Manifest
from tasks.stage import RUN_RECORD, BuildContext, Stage, key_settings


def lineage(settings: TrainSettings) -> dict[str, Any]:
    """The settings that make a training run's weights at each step what they are: the key's,
    without the `not_in_lineage` fields (length, checkpoint cadence), with the effective decay
    horizon (`lr_decay_iters`, else `train_iters` — then a longer run changes every step's
    learning rate and is a run of its own)."""
    data = key_settings(settings)
    for name, info in type(settings).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("lineage") is False:
            data.pop(name, None)
    data["lr_decay_iters"] = settings.decay_iters
    return data


def _run_id(work: Path, save: Path) -> str:
    """The id of the run in this scratch folder: a new one when it starts with no checkpoint
    (its checkpoints will be new weights), else the one its checkpoints were made by."""
    from megatron_bridge import checkpoint

    record = work / RUN_RECORD
    if record.is_file() and checkpoint.available_iterations(save):
        return json.loads(record.read_text())["run_id"]
    run_id = uuid.uuid4().hex
    tmp = work / f".{RUN_RECORD}.tmp"
    tmp.write_text(json.dumps({"run_id": run_id}) + "\n")
    tmp.rename(record)
    return run_id


def resolve_device(settings: TrainSettings) -> str:
    """`auto`: CUDA if this machine has it — or, for a cluster launcher, if the nodes will (the
    worker starting the job may have no GPU; set `device: cpu` for a CPU cluster)."""
    if settings.device == "auto":
        if settings.launcher != "local":
            return "cuda"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return settings.device


def _progress(metrics: Path, total: int, log) -> threading.Event:
    """Follow metrics.jsonl into a Prefect progress artifact (when in a Prefect run)."""
    stop = threading.Event()
    try:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        artifact = create_progress_artifact(0.0, key="train-progress",
                                            description="training steps done (%)")
    except Exception:  # not inside a Prefect run (plain function call)
        return stop

    def follow() -> None:
        done = -1
        while not stop.wait(2.0):
            record = latest_metrics(metrics)
            step = record["step"] if record else 0
            if step != done:
                done = step
                try:
                    update_progress_artifact(artifact, 100.0 * step / total)
                except Exception as e:  # the UI is informative; never fail training for it
                    log.debug("progress artifact: %s", e)

    threading.Thread(target=follow, daemon=True).start()
    return stop


def plot_loss(metrics: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per supervised token)")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def launch(settings: TrainSettings, job_path: Path, work: Path, workdir: Path, device: str,
           log) -> None:
    """Run the job with the configured launcher (returns when every rank has finished)."""
    timeout = settings.timeout_minutes * 60
    run_id = f"rsft-{work.name}"
    if settings.launcher == "kubernetes":
        from tasks.kubernetes.launch import run_pytorchjob

        run_pytorchjob(settings, job_path, work, workdir, run_id, device, timeout, log)
        return
    if settings.launcher == "slurm":
        commands = [train_launch.slurm_command(settings, job_path, run_id)]
    else:
        gpus = train_launch.visible_gpus() if device == "cuda" else None
        commands = train_launch.local_commands(settings, job_path, run_id, gpus)
    train_launch.run_agents(commands, work / "train.log", timeout, log)


def build(ctx: BuildContext) -> None:
    from megatron_bridge import checkpoint
    from megatron_bridge.training.job import TrainJob

    settings: TrainSettings = ctx.settings
    assert ctx.scratch is not None
    work = ctx.scratch
    work.mkdir(parents=True, exist_ok=True)
    lock = FileLock(work / ".lock")  # an OS lock: a killed holder releases it
    try:
        lock.acquire(timeout=0)
    except Timeout:
        ctx.log.info("train: another run of this training lineage is training in %s; waiting "
                     "for it (then this one continues from its checkpoints)", work)
        lock.acquire()
    try:
        _train(ctx, settings, work)
    finally:
        lock.release()


def _train(ctx: BuildContext, settings: TrainSettings, work: Path) -> None:
    from megatron_bridge import checkpoint
    from megatron_bridge.training.job import TrainJob, read_metrics
    from megatron_bridge.training.state import resume_point

    save = work / "checkpoints"
    run_id = _run_id(work, save)
    keep = sorted((ctx.options or {}).get("keep", []))
    job = TrainJob(train=settings, checkpoint=str(ctx.upstream["convert"].dir),
                   data=str(ctx.upstream["tokenize"].dir), save=str(save),
                   device=resolve_device(settings), metrics=str(work / "metrics.jsonl"), keep=keep)
    job_path = work / "job.json"
    job.write(job_path)
    resumed = resume_point(save, settings.train_iters)
    ctx.log.info("train: %s in %s (%s)", "resuming" if resumed else "starting", work,
                 f"from its checkpoint of iteration {resumed}" if resumed
                 else "fine-tuning the converted model")
    stop = _progress(job.metrics_path, settings.train_iters, ctx.log)
    try:
        launch(settings, job_path, work, ctx.store.workdir, job.device, ctx.log)
    finally:
        stop.set()
    iteration = settings.train_iters
    final = checkpoint.iteration_dir(save, iteration)
    if not final.is_dir():
        raise RuntimeError(f"training stopped at iteration {resume_point(save, iteration)} of "
                           f"{iteration}")
    # Publish the final checkpoint: hard links (same disk: no copy), else copies.
    shutil.copytree(final, checkpoint.iteration_dir(ctx.out, iteration),
                    copy_function=_link_or_copy)
    shutil.copyfile(save / checkpoint.METADATA, ctx.out / checkpoint.METADATA)
    (ctx.out / checkpoint.TRACKER).write_text(str(iteration))
    # This run's steps (the folder may also hold a longer run's), each step's latest record.
    metrics = read_metrics(job.metrics_path, until=iteration)
    (ctx.out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    shutil.copyfile(work / "train.log", ctx.out / "train.log")
    (ctx.out / RUN_RECORD).write_text(json.dumps({"run_id": run_id, "lineage": work.name}) + "\n")
    plot_loss(metrics, ctx.out / "loss.png")
    ctx.meta.update(iterations=iteration, final_loss=metrics[-1]["loss"],
                    first_loss=metrics[0]["loss"], device=job.device, lineage=work.name,
                    decay_iters=settings.decay_iters)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def report(manifest: Manifest) -> list[dict[str, Any]]:
    metrics = [json.loads(line) for line in (manifest.dir / "metrics.jsonl").read_text().splitlines()]
    every = max(1, len(metrics) // 20)
    return [{k: m[k] for k in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "memory_gb")}
            for m in metrics[::every] + ([metrics[-1]] if len(metrics) % every != 1 else [])]


def markdown(manifest: Manifest) -> str:
    metrics = [json.loads(line) for line in (manifest.dir / "metrics.jsonl").read_text().splitlines()]
    first, last = metrics[0], metrics[-1]
    return (f"### Training\n\n{last['step']} steps; loss {first['loss']:.4f} → {last['loss']:.4f}; "
            f"last step {last['tokens_per_s']:.0f} tokens/s, {last['memory_gb']:.2f} GB peak.\n\n"
            f"Checkpoint `{manifest.dir}` (Megatron layout), loss curve `loss.png`, log `train.log`.")


def gpus(settings: TrainSettings) -> int:
    """Slots of this host's `gpu` limit: none when the job runs on a cluster's nodes; every
    local agent's processes otherwise."""
    if settings.launcher != "local" or resolve_device(settings) != "cuda":
        return 0
    return settings.nproc_per_node * settings.nnodes


STAGE = Stage(
    name="train", version="3", settings=lambda s: s.train, build=build,
    upstream=("convert", "tokenize"), report=report, markdown=markdown, gpus=gpus,
    lineage=lineage,
    # Per-step seconds and tokens/s, and the run's id; the weights are the content.
    records=("metrics.jsonl", RUN_RECORD),
    description="megatron-core SFT: the final checkpoint, metrics and loss curve",
)
