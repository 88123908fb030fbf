"""Stage `train`: megatron-core SFT under torchrun, launched and watched from here.

The job (`megatron_bridge/training/job.py`) is written into the stage's scratch folder
`<workdir>/scratch/train/<lineage>/`, which also holds the checkpoints. It is keyed by the
training run's *lineage* — the artifact's key material without the run's length and checkpoint
cadence, plus the learning-rate decay horizon — so a rerun (after a crash, a kill, a timeout)
resumes from the latest checkpoint there, and a longer run of the same lineage continues the
shorter one (Megatron-LM's way of extending a run: raise `train_iters`, keep `lr_decay_iters`).
One run trains in a lineage's folder at a time (a file lock). A forced build (`--from train`,
`--force train`) sets the folder's run aside (`previous-<time>/`) and trains afresh. torchrun runs in its own process
group with its own timeout; rank-0 lines go to the Prefect log, every line to `train.log`; per-step
metrics (JSON lines) feed a progress artifact while it runs. The artifact is the final checkpoint (Megatron layout, loadable by `rsft convert mcore2hf`)
with `metrics.jsonl`, `loss.png`, the log and the TensorBoard event files (`tensorboard/`; W&B
and MLflow runs stay in the scratch folder).
"""

from __future__ import annotations

import contextvars
import json
import os
import shutil
import threading
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from settings.models import TrainSettings
from tasks import train_launch
from tasks.agent_watch import recent_metrics
from tasks.artifacts import Manifest
from tasks.stage import (RUN_RECORD, BuildContext, Stage, inline_png, key_settings,
                         run_artifact_key)


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


def epoch_steps(settings: TrainSettings, tokenized: Path) -> int:
    """`train.epochs` as optimizer steps: ceil(epochs × the tokenize artifact's packed train rows
    ÷ global_batch_size)."""
    import math

    rows = json.loads((tokenized / "stats.json").read_text())["splits"]["train"]["rows"]
    assert settings.epochs is not None
    # round first: 0.1 × 30 rows is 3.0000000000000004 in floats, 3 steps, not 4
    return max(1, math.ceil(round(settings.epochs * rows / settings.global_batch_size, 9)))


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


LIVE_ROWS = 10
"""Recent steps in the live table (and the step times the ETA is averaged over)."""
TICK_SECONDS = 2.0
"""How often the watcher reads metrics.jsonl and, when a step was added, updates the UI."""


def eta_seconds(records: list[dict[str, Any]], total: int) -> float | None:
    """Time left: the mean of the recent steps' `seconds` × the steps still to run (None before
    the first record)."""
    times = [r["seconds"] for r in records[-LIVE_ROWS:] if "seconds" in r]
    if not times:
        return None
    return sum(times) / len(times) * max(0, total - records[-1]["step"])


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def progress_line(records: list[dict[str, Any]], total: int) -> str:
    """`step 8/12, ETA 0:00:41, loss 2.3456` (the first line is what the UI's card shows)."""
    if not records:
        return f"step 0/{total}, starting"
    last, eta = records[-1], eta_seconds(records, total)
    line = f"step {last['step']}/{total}"
    if last["step"] >= total:
        line += ", done"
    elif eta is not None:
        line += f", ETA {_clock(eta)}"
    if "loss" in last:
        line += f", loss {last['loss']:.4f}"
    return line


def live_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The recent steps, newest first: step, loss, val_loss (when any record has it), lr,
    tokens/s."""
    with_val = any("val_loss" in r for r in records)
    rows = []
    for r in reversed(records[-LIVE_ROWS:]):
        row = {"step": r["step"], "loss": _round(r.get("loss"))}
        if with_val:
            row["val_loss"] = _round(r.get("val_loss"))
        row.update(lr=r.get("lr"), tokens_per_s=r.get("tokens_per_s"))
        rows.append(row)
    return rows


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _live_description(records: list[dict[str, Any]], total: int) -> str:
    val = [r for r in records if r.get("val_loss") is not None]
    text = f"training: {progress_line(records, total)}"
    if val:
        text += f", val loss {val[-1]['val_loss']:.4f} (step {val[-1]['step']})"
    return text + f"\n\nThe last {LIVE_ROWS} logged steps, newest first (updated while it trains)."


class _Watch:
    """Follows metrics.jsonl into two Prefect artifacts of the train task run while torchrun
    runs: the progress (its description `step 8/12, ETA 0:00:41, …`) and a table of the recent
    steps, both updated in place (new versions would list one card per update on the flow-run
    page). It reads at most every TICK_SECONDS and never fails training."""

    def __init__(self, metrics: Path, total: int, log):
        self.metrics, self.total, self.log = metrics, total, log
        self.stop = threading.Event()
        self.done = -1
        self.progress = self.table = None
        self.thread: threading.Thread | None = None

    def start(self) -> _Watch:
        from prefect.artifacts import create_progress_artifact
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is None:  # a plain function call: no Prefect run to show it in
            return self
        try:
            self.progress = create_progress_artifact(
                0.0, key=run_artifact_key("train-progress"),
                description=progress_line([], self.total))
        except Exception as e:  # noqa: BLE001 - the UI is informative; training goes on
            self.log.warning("train: no progress artifact (%s)", e)
            return self
        # the run's context, so the table is created in this task run too
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._follow,),
                                       daemon=True, name="train-progress")
        self.thread.start()
        return self

    def close(self) -> None:
        """Stop following, after one last update (the final step)."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def _follow(self) -> None:
        while True:
            stopping = self.stop.wait(TICK_SECONDS)
            try:
                self.update(recent_metrics(self.metrics, LIVE_ROWS))
            except Exception as e:  # noqa: BLE001 - never fail training for the UI
                self.log.debug("train: progress artifacts: %s", e)
            if stopping:
                return

    def update(self, records: list[dict[str, Any]]) -> None:
        from prefect.artifacts import create_table_artifact, update_progress_artifact
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactUpdate

        if not records or records[-1]["step"] == self.done:
            return
        self.done = records[-1]["step"]
        update_progress_artifact(self.progress, min(100.0, 100.0 * self.done / self.total),
                                 description=progress_line(records, self.total))
        rows, description = live_rows(records), _live_description(records, self.total)
        if self.table is None:
            self.table = create_table_artifact(rows, key=run_artifact_key("train-live"),
                                               description=description)
        else:
            with get_client(sync_client=True) as client:
                client.update_artifact(self.table, ArtifactUpdate(
                    data=json.dumps(rows), description=description))


def plot_loss(metrics: list[dict[str, Any]], path: Path) -> None:
    """Training loss per step, and the validation loss where records have one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    train = [m for m in metrics if m.get("loss") is not None]
    ax.plot([m["step"] for m in train], [m["loss"] for m in train], label="train")
    if val := [m for m in metrics if m.get("val_loss") is not None]:
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
    lock = FileLock(work / ".lock")  # an OS lock: a killed holder releases it
    try:
        lock.acquire(timeout=0)
    except Timeout:
        ctx.log.info("train: another run of this training lineage is training in %s; waiting "
                     "for it (then this one continues from its checkpoints)", work)
        lock.acquire()
    try:
        if ctx.force:
            set_aside(work, ctx.log)
        _train(ctx, settings, work)
    finally:
        lock.release()


PREVIOUS = "previous-"
"""Runs set aside by a forced retrain live in `<lineage folder>/previous-<time>/`."""


def set_aside(work: Path, log) -> Path | None:
    """A forced build trains afresh: move the lineage folder's run (checkpoints, metrics,
    run id, trackers' state — all but the lock and earlier set-aside runs) into
    `previous-<time>/` inside it, never deleting it. None when there was nothing to move."""
    import time

    entries = [p for p in work.iterdir() if p.name != ".lock" and not p.name.startswith(PREVIOUS)]
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = work / f"{PREVIOUS}{stamp}", 1
    while aside.exists():  # two retrains within one second
        n += 1
        aside = work / f"{PREVIOUS}{stamp}-{n}"
    aside.mkdir()
    for p in entries:
        p.rename(aside / p.name)
    log.info("train: forced: the previous run of this lineage (its checkpoints, metrics and "
             "tracking state) was moved to %s; training afresh from the converted model", aside)
    return aside


def _train(ctx: BuildContext, settings: TrainSettings, work: Path) -> None:
    from megatron_bridge import checkpoint
    from megatron_bridge.training.job import TrainJob, read_metrics
    from megatron_bridge.training.state import resume_point

    if settings.epochs is not None:  # the plan resolved it from the same artifact; the job
        settings = settings.with_steps(epoch_steps(settings, ctx.upstream["tokenize"].dir))
        settings = settings.for_trainer()  # gets plain train_iters
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
    watch = _Watch(job.metrics_path, settings.train_iters, ctx.log).start()
    try:
        launch(settings, job_path, work, ctx.store.workdir, job.device, ctx.log)
    finally:
        watch.close()
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
    if (work / "tensorboard").is_dir():  # W&B and MLflow stay in the scratch folder
        shutil.copytree(work / "tensorboard", ctx.out / "tensorboard")
    if (val := final_losses(metrics))["val_loss"] is not None:
        ctx.meta.update(final_val_loss=val["val_loss"], final_val_step=val["val_step"])


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _metrics(manifest: Manifest) -> list[dict[str, Any]]:
    from megatron_bridge.training.job import read_metrics

    return read_metrics(manifest.dir / "metrics.jsonl")


def report(manifest: Manifest) -> list[dict[str, Any]]:
    metrics = _metrics(manifest)
    every = max(1, len(metrics) // 20)
    columns = ["step", "loss", *(["val_loss"] if any("val_loss" in m for m in metrics) else []),
               "lr", "grad_norm", "tokens_per_s", "memory_gb"]
    rows = metrics[::every]
    if rows[-1] is not metrics[-1]:  # the last step always, once
        rows.append(metrics[-1])
    return [{k: m.get(k) for k in columns} for m in rows]


def final_losses(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """The last train loss and the last validation loss (with its step) of a run's records."""
    train = [m for m in metrics if m.get("loss") is not None]
    val = [m for m in metrics if m.get("val_loss") is not None]
    return {"step": metrics[-1]["step"], "first_loss": train[0]["loss"] if train else None,
            "loss": train[-1]["loss"] if train else None,
            "val_loss": val[-1]["val_loss"] if val else None,
            "val_step": val[-1]["step"] if val else None}


def markdown(manifest: Manifest) -> str:
    """The summary with the loss curve inline (the Prefect UI shows it)."""
    metrics = _metrics(manifest)
    last, losses = metrics[-1], final_losses(metrics)
    val = (f"; validation loss {losses['val_loss']:.4f} (step {losses['val_step']})"
           if losses["val_loss"] is not None else "")
    return (f"### Training\n\n{last['step']} steps; loss {losses['first_loss']:.4f} → "
            f"{losses['loss']:.4f}{val}; last step {last['tokens_per_s']:.0f} tokens/s, "
            f"{last['memory_gb']:.2f} GB peak.\n\n"
            f"{inline_png(manifest.dir / 'loss.png', 'loss curve')}\n\n"
            f"Checkpoint `{manifest.dir}` (Megatron layout), with `loss.png`, `metrics.jsonl`, "
            "`train.log` and TensorBoard events in `tensorboard/`.")


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
    # Per-step seconds and tokens/s (also in the event files), the run's id; the weights are
    # the content.
    records=("metrics.jsonl", RUN_RECORD, "tensorboard/*"),
    description="megatron-core SFT: the final checkpoint, metrics and loss curve",
)
