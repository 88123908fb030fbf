"""Stage `train`: megatron-core SFT under torchrun, launched and watched from here.

The job (`megatron_bridge/training/job.py`) is written into the stage's scratch folder
`<workdir>/scratch/train/<key>/`, which also holds the checkpoints: a rerun of the same key
(after a crash, a kill, a timeout) resumes from the latest checkpoint there instead of starting
over. torchrun runs in its own process group with its own timeout; rank-0 lines go to the Prefect
log, every line to `train.log`; per-step metrics (JSON lines) feed a progress artifact while it
runs. The artifact is the final checkpoint (Megatron layout, loadable by `rsft convert mcore2hf`)
with `metrics.jsonl`, `loss.png`, the log and the TensorBoard event files (`tensorboard/`; W&B
and MLflow runs stay in the scratch folder).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from settings.models import TrainSettings
from tasks import train_launch
from tasks.agent_watch import latest_metrics
from tasks.artifacts import Manifest
from tasks.stage import BuildContext, Stage


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
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label="train")
    if val := [m for m in metrics if "val_loss" in m]:
        ax.plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", label="validation")
        ax.legend()
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
    save = work / "checkpoints"
    job = TrainJob(train=settings, checkpoint=str(ctx.upstream["convert"].dir),
                   data=str(ctx.upstream["tokenize"].dir), save=str(save),
                   device=resolve_device(settings), metrics=str(work / "metrics.jsonl"))
    job_path = work / "job.json"
    job.write(job_path)
    resumed = (save / checkpoint.TRACKER).is_file()
    ctx.log.info("train: %s in %s (%s)", "resuming" if resumed else "starting", work,
                 "from its latest checkpoint" if resumed else "fine-tuning the converted model")
    stop = _progress(job.metrics_path, settings.train_iters, ctx.log)
    try:
        launch(settings, job_path, work, ctx.store.workdir, job.device, ctx.log)
    finally:
        stop.set()
    iteration = int(checkpoint.read_tracker(save))
    if iteration != settings.train_iters:
        raise RuntimeError(f"training stopped at iteration {iteration} of {settings.train_iters}")
    # Publish the final checkpoint: hard links (same disk: no copy), else copies.
    final = checkpoint.iteration_dir(save, iteration)
    shutil.copytree(final, checkpoint.iteration_dir(ctx.out, iteration),
                    copy_function=_link_or_copy)
    shutil.copyfile(save / checkpoint.METADATA, ctx.out / checkpoint.METADATA)
    (ctx.out / checkpoint.TRACKER).write_text(str(iteration))
    metrics = [json.loads(line) for line in job.metrics_path.read_text().splitlines()]
    shutil.copyfile(job.metrics_path, ctx.out / "metrics.jsonl")
    shutil.copyfile(work / "train.log", ctx.out / "train.log")
    if (work / "tensorboard").is_dir():  # W&B and MLflow stay in the scratch folder
        shutil.copytree(work / "tensorboard", ctx.out / "tensorboard")
    plot_loss(metrics, ctx.out / "loss.png")
    ctx.meta.update(iterations=iteration, final_loss=metrics[-1]["loss"],
                    first_loss=metrics[0]["loss"], device=job.device)
    if "val_loss" in metrics[-1]:  # validation runs after the last step
        ctx.meta.update(final_val_loss=metrics[-1]["val_loss"],
                        final_val_tokens=metrics[-1]["val_tokens"])


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def report(manifest: Manifest) -> list[dict[str, Any]]:
    metrics = [json.loads(line) for line in (manifest.dir / "metrics.jsonl").read_text().splitlines()]
    every = max(1, len(metrics) // 20)
    keys = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "memory_gb")
    if any("val_loss" in m for m in metrics):
        keys += ("val_loss",)
    return [{k: m.get(k) for k in keys}
            for m in metrics[::every] + ([metrics[-1]] if len(metrics) % every != 1 else [])]


def markdown(manifest: Manifest) -> str:
    metrics = [json.loads(line) for line in (manifest.dir / "metrics.jsonl").read_text().splitlines()]
    first, last = metrics[0], metrics[-1]
    val = f"; validation loss {last['val_loss']:.4f}" if "val_loss" in last else ""
    return (f"### Training\n\n{last['step']} steps; loss {first['loss']:.4f} → {last['loss']:.4f}{val}; "
            f"last step {last['tokens_per_s']:.0f} tokens/s, {last['memory_gb']:.2f} GB peak.\n\n"
            f"Checkpoint `{manifest.dir}` (Megatron layout), loss curve `loss.png`, log `train.log`"
            + (", TensorBoard events `tensorboard/`." if (manifest.dir / "tensorboard").is_dir()
               else "."))


def gpus(settings: TrainSettings) -> int:
    """Slots of this host's `gpu` limit: none when the job runs on a cluster's nodes; every
    local agent's processes otherwise."""
    if settings.launcher != "local" or resolve_device(settings) != "cuda":
        return 0
    return settings.nproc_per_node * settings.nnodes


STAGE = Stage(
    name="train", version="2", settings=lambda s: s.train, build=build,
    upstream=("convert", "tokenize"), report=report, markdown=markdown, gpus=gpus,
    # per-step seconds and tokens/s, the same as event files; the weights are the content
    records=("metrics.jsonl", "tensorboard/*"),
    description="megatron-core SFT: the final checkpoint, metrics and loss curve",
)
