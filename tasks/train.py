"""Stage `train`: megatron-core SFT under torchrun, launched and watched from here.

The job (`megatron_bridge/training/job.py`) is written into the stage's scratch folder
`<workdir>/scratch/train/<key>/`, which also holds the checkpoints: a rerun of the same key
(after a crash, a kill, a timeout) resumes from the latest checkpoint there instead of starting
over. torchrun runs in its own process group with its own timeout; rank-0 lines go to the Prefect
log, every line to `train.log`; per-step metrics (JSON lines) feed a progress artifact while it
runs. The artifact is the final checkpoint (Megatron layout, loadable by `rsft convert mcore2hf`)
with `metrics.jsonl`, `loss.png` and the log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from settings.errors import UserError
from settings.models import TrainSettings
from tasks.artifacts import Manifest
from tasks.stage import BuildContext, Stage


def resolve_device(settings: TrainSettings) -> str:
    import torch

    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return settings.device


def make_job(settings: TrainSettings, checkpoint: Path, data: Path, save: Path):
    from megatron_bridge.training.job import TrainJob

    return TrainJob(
        checkpoint=str(checkpoint), data=str(data), save=str(save),
        train_iters=settings.train_iters, global_batch_size=settings.global_batch_size,
        micro_batch_size=settings.micro_batch_size, tensor_parallel=settings.tensor_parallel,
        pipeline_parallel=settings.pipeline_parallel, lr=settings.lr, min_lr=settings.min_lr,
        lr_warmup_iters=settings.lr_warmup_iters, lr_decay_style=settings.lr_decay_style,
        adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
        weight_decay=settings.weight_decay, clip_grad=settings.clip_grad,
        precision=settings.precision, use_distributed_optimizer=settings.use_distributed_optimizer,
        device=resolve_device(settings), seed=settings.seed, save_interval=settings.save_interval,
        keep_last=settings.keep_last, log_interval=settings.log_interval,
        recompute=settings.recompute)


def launch_command(settings: TrainSettings, job_path: Path) -> list[str]:
    from megatron_bridge.launch import free_port

    nproc = settings.nproc_per_node
    if nproc == 1 and settings.nnodes == 1:
        return [sys.executable, "-m", "megatron_bridge.training", str(job_path)]
    port = settings.master_port or free_port()
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--nnodes", str(settings.nnodes), "--node_rank", str(settings.node_rank),
            "--master_addr", settings.master_addr, "--master_port", str(port),
            "-m", "megatron_bridge.training", str(job_path)]


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
            if not metrics.is_file():
                continue
            lines = metrics.read_text().splitlines()
            step = json.loads(lines[-1])["step"] if lines else 0
            if step != done:
                done = step
                try:
                    update_progress_artifact(artifact, 100.0 * step / total)
                except Exception as e:  # the UI is informative; never fail training for it
                    log.debug("progress artifact: %s", e)

    threading.Thread(target=follow, daemon=True).start()
    return stop


def run_training(command: list[str], log_path: Path, timeout: float, log) -> None:
    """Run torchrun in its own process group; forward rank-0 lines; kill the group on timeout
    or cancellation. Raises UserError for the trainer's `error:` lines."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    deadline = time.monotonic() + timeout
    errors: list[str] = []
    with open(log_path, "a") as log_file:
        log_file.write(f"$ {' '.join(command)}\n")
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, start_new_session=True)
        timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log_file.write(line)
                log_file.flush()
                text = line.rstrip()
                # torchrun prefixes worker lines with "[rankN]:" only for tracebacks; the
                # trainer prints on rank 0 only, so forward its lines and errors.
                if text.startswith(("step ", "training:")):
                    log.info("train: %s", text)
                elif "error: " in text:
                    errors.append(text.split("error: ", 1)[1])
            proc.wait()
        except BaseException:  # cancelled: never leave ranks running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            timer.cancel()
    if time.monotonic() >= deadline and proc.returncode:
        raise UserError(f"train: timed out after {timeout / 60:.0f} min (train.timeout_minutes); "
                        "rerun to resume from the latest checkpoint")
    if errors:
        raise UserError(f"train: {errors[-1]}")
    if proc.returncode:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"training failed (exit {proc.returncode}); see {log_path}:\n{tail}")


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


def build(ctx: BuildContext) -> None:
    from megatron_bridge import checkpoint

    settings: TrainSettings = ctx.settings
    assert ctx.scratch is not None
    work = ctx.scratch
    work.mkdir(parents=True, exist_ok=True)
    save = work / "checkpoints"
    job = make_job(settings, ctx.upstream["convert"].dir, ctx.upstream["tokenize"].dir, save)
    job.metrics = str(work / "metrics.jsonl")
    job_path = work / "job.json"
    job.write(job_path)
    resumed = (save / checkpoint.TRACKER).is_file()
    ctx.log.info("train: %s in %s (%s)", "resuming" if resumed else "starting", work,
                 "from its latest checkpoint" if resumed else "fine-tuning the converted model")
    stop = _progress(job.metrics_path, settings.train_iters, ctx.log)
    try:
        run_training(launch_command(settings, job_path), work / "train.log",
                     settings.timeout_minutes * 60, ctx.log)
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
    plot_loss(metrics, ctx.out / "loss.png")
    ctx.meta.update(iterations=iteration, final_loss=metrics[-1]["loss"],
                    first_loss=metrics[0]["loss"], device=job.device)


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
    return settings.nproc_per_node if resolve_device(settings) == "cuda" else 0


STAGE = Stage(
    name="train", version="1", settings=lambda s: s.train, build=build,
    upstream=("convert", "tokenize"), report=report, markdown=markdown, gpus=gpus,
    description="megatron-core SFT: the final checkpoint, metrics and loss curve",
)
