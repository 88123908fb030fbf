"""Run `python -m megatron_bridge ...` as its own process group: one process, or `torchrun` with
TP×PP processes. Own timeout (the whole group is killed), full log to a file, and a user mistake
reported by the bridge (exit 2, `error: …`) comes back as `UserError` with that one line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from settings.errors import UserError, reported_error


def die_with_parent() -> Callable[[], None]:
    """A `preexec_fn`: the child gets SIGKILL when the process starting it dies (Linux), so a
    kill -9 of the flow never leaves a stage's job running on, writing into a folder that the
    rerun uses."""
    parent = os.getpid()

    def arm() -> None:
        if _prctl is not None:
            _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return arm


def _load_prctl():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_prctl = _load_prctl()


def die_with_torchrun_agent() -> None:
    """In a rank that torchrun started: get SIGKILL when the agent dies. torchrun starts every
    rank in a session of its own, so killing the agent's process group (a timeout, a
    cancellation, a kill -9 of the flow) would otherwise leave the ranks running on."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or _prctl is None:
        return
    agent = os.getppid()
    _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != agent:  # the agent died before prctl took effect
        os._exit(1)


def free_port() -> int:
    """A free TCP port on loopback for a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(args: list[str], nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "megatron_bridge", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "megatron_bridge", *args]


def check_devices(nproc: int) -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        raise UserError(f"TP×PP = {nproc} processes need {nproc} GPUs; this machine has "
                          f"{torch.cuda.device_count()}")


def run_bridge(args: list[str], layout: tuple[int, int] | None = None,
               log_file: Path | None = None, timeout: float | None = None) -> str:
    """Run the bridge; with a (TP, PP) layout, on TP×PP processes with `--tp/--pp` passed on.
    Returns its stdout. Raises UserError (user mistake) or RuntimeError."""
    nproc = 1
    if layout is not None:
        tp, pp = layout
        nproc = tp * pp
        hf = Path(args[args.index("--hf") + 1]) if "--hf" in args else None
        if args[0] == "hf2mcore" and hf and (hf / "config.json").is_file():
            from megatron_bridge.build import check_layout, read_hf_config

            check_layout(read_hf_config(hf), tp, pp)  # before starting TP×PP processes
        args = [*args, "--tp", str(tp), "--pp", str(pp)]
    check_devices(nproc)
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                             str(max(1, (os.cpu_count() or 1) // nproc)))}
    return run_command(command(args, nproc), f"megatron_bridge {args[0]}", log_file, timeout, env)


def run_command(cmd: list[str], what: str, log_file: Path | None = None,
                timeout: float | None = None, env: dict[str, str] | None = None) -> str:
    """Run a Python entry point in its own process group (killed whole on timeout or
    interruption), log its output, and turn its `error: …` line (exit 2) into UserError."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True,
                            preexec_fn=die_with_parent())
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"{what} timed out after {timeout:.0f} s") from None
    except BaseException:  # interrupted or cancelled: never leave the processes running
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    if log_file is not None:
        Path(log_file).write_text(f"$ {' '.join(cmd)}\n{out}\n{err}")
    if proc.returncode and (reported := reported_error(err.splitlines())):
        raise UserError(reported)
    if proc.returncode:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n"
                           + "\n".join(err.splitlines()[-30:]))
    return out
