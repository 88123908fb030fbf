"""Ctrl-C during `rsft run`: stop everything within a second, say in one line where a rerun
picks up, exit 130.

Why `rsft run` needs its own SIGINT handler: a terminal's Ctrl-C reaches the whole foreground
process group, which holds Prefect's ephemeral API server (it stops at once) but not the stages'
jobs (torchrun, the bridge, lighteval run in sessions of their own). Left to Prefect, the
interrupted flow then spends minutes retrying the dead server to report its crash (`Unable to
connect to 'ws://…/api/events/in'`) while the stage threads wait on jobs that train on, and a
second Ctrl-C prints every thread's traceback. Nothing is lost by ending the process at once:
artifacts are published atomically and training resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from settings.models import PipelineSettings
from tasks.artifacts import ArtifactStore

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


def resume_line(settings: PipelineSettings, planned) -> str:
    """Where a rerun picks up: the training step reached and the checkpoint it resumes from,
    else which stages were running (they are rebuilt; finished ones are reused)."""
    from megatron_bridge.training.state import resume_point
    from tasks.agent_watch import latest_metrics

    store = ArtifactStore(settings.workdir)
    built = {p.name for p in planned if p.action == "reuse"
             or store.check(p.name, p.plan.key)[0] is not None}
    train = next((p for p in planned if p.name == "train" and p.name not in built), None)
    if train is not None:
        work = store.scratch("train", train.plan.scratch)
        record = latest_metrics(work / "metrics.jsonl")
        if record is not None:
            # a longer run of the lineage may have left later checkpoints: this run's resume point
            saved = resume_point(work / "checkpoints", train.section.train_iters) or 0
            resume = (f"`rsft run` resumes from step {saved}" if saved else
                      "`rsft run` starts training over (no checkpoint yet: one every "
                      f"train.save_interval = {settings.train.save_interval} steps)")
            return f"interrupted at step {record['step']}; {resume}"
    from tasks import BY_NAME

    running = [p.name for p in planned if p.name not in built
               and all(u in built for u in BY_NAME[p.name].upstream)]
    if not running:
        return "interrupted; `rsft run` reuses every stage already built"
    return (f"interrupted while {', '.join(running)} ran; `rsft run` reuses the stages already "
            "built and redoes the rest")


def _kill_descendants() -> None:
    """SIGKILL every process this one started, with the process groups they lead (a torchrun
    agent's ranks, the bridge's processes); the ephemeral API server is one of them."""
    import psutil

    try:
        tree = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    own = os.getpgrp()
    for proc in tree:
        try:
            pgid = os.getpgid(proc.pid)
            if pgid == proc.pid and pgid != own:
                os.killpg(pgid, signal.SIGKILL)
            else:
                proc.kill()
        except (ProcessLookupError, psutil.Error):
            pass


def _mark_cancelled(message: str, timeout: float = 3.0) -> None:
    """Tell a Prefect server (not the ephemeral one: it has just stopped) that the run ended,
    so its UI does not show it Running forever; given up after `timeout` seconds."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    context = FlowRunContext.get()
    if context is None or context.flow_run is None or not PREFECT_API_URL.value():
        return
    run_id = context.flow_run.id

    def send() -> None:
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        try:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(run_id, Cancelled(message=message), force=True)
        except Exception:  # noqa: BLE001 - best effort: the process ends either way
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    sender.join(timeout)


def install(settings: PipelineSettings, planned) -> None:
    """From now on, SIGINT ends this process as the module docstring says."""

    def on_interrupt(signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C changes nothing
        logging.disable(logging.CRITICAL)  # Prefect's threads would log their failures
        _kill_descendants()
        try:
            line = resume_line(settings, planned)
        except Exception as e:  # noqa: BLE001 - the exit must not depend on it
            line = f"interrupted ({type(e).__name__} while finding where to resume)"
        _mark_cancelled(line)
        sys.stdout.flush()
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        # No interpreter shutdown: it would join Prefect's worker threads, which retry the
        # stopped server for minutes.
        os._exit(EXIT_INTERRUPTED)

    signal.signal(signal.SIGINT, on_interrupt)

