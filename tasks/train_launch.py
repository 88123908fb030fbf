"""Starting the training job's torchrun agents, one per node, and watching them.

Every launcher runs the same agent command: `torchrun --nnodes N --nproc_per_node P` meeting at a
c10d rendezvous on the first node, so one job description trains on one GPU host, on a Slurm
allocation or on Kubernetes alike:

- `local`: all N agents on this machine (N = 1 normally; N > 1 rehearses a multi-node job on
  loopback, which is how the multi-node path is tested without a cluster);
- `slurm`: `srun --nodes N --ntasks-per-node 1` from inside the allocation the flow runs in;
- `kubernetes`: a PyTorchJob (`tasks/kubernetes/`).

The agents run in their own process groups (killed whole on timeout or cancellation). Node 0's
output goes through the watcher all launchers share (`tasks/agent_watch.py`: `train.log`, the
trainer's lines to the Prefect log, the outcome); other local nodes' output to `train.node<i>.log`.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from megatron_bridge.launch import die_with_parent, free_port
from settings.errors import UserError
from settings.models import TrainSettings
from tasks.agent_watch import AgentWatch

SLURM_RDZV_PORT = 29500
TRAINER = ["-m", "megatron_bridge.training"]


def agent_command(settings: TrainSettings, job_path: Path | str, endpoint: str,
                  run_id: str) -> list[str]:
    """One node's torchrun agent (a plain process when the whole job is one process)."""
    if settings.nproc_per_node == 1 and settings.nnodes == 1:
        return [sys.executable, *TRAINER, str(job_path)]
    return [sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(settings.nnodes), "--nproc_per_node", str(settings.nproc_per_node),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", run_id,
            "--max_restarts", "0", *TRAINER, str(job_path)]


def local_commands(settings: TrainSettings, job_path: Path, run_id: str,
                   gpus: list[str] | None = None) -> list[list[str]]:
    """N agents on this machine, meeting on loopback. Each agent sees its own `nproc_per_node`
    of `gpus` (this host's visible GPU ids): every agent numbers its ranks' devices from 0, so
    agents sharing the host's GPUs would put several ranks on one. No `gpus`: a CPU job, which
    sees none (megatron-core would otherwise take a GPU the host happens to have)."""
    endpoint = f"127.0.0.1:{settings.rdzv_port or free_port()}"
    command = agent_command(settings, job_path, endpoint, run_id)
    per_node, needed = settings.nproc_per_node, settings.nproc_per_node * settings.nnodes
    if gpus is not None and len(gpus) < needed:
        raise UserError(f"nnodes × nproc_per_node = {needed} GPUs, this host has "
                        f"{len(gpus)}; lower train.nproc_per_node or nnodes")
    return [["env", "CUDA_VISIBLE_DEVICES="
             + (",".join(gpus[i * per_node:(i + 1) * per_node]) if gpus is not None else ""),
             *command] for i in range(settings.nnodes)]


def visible_gpus() -> list[str]:
    """This host's GPU ids as CUDA numbers them for a child process."""
    import torch

    if visible := os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [g.strip() for g in visible.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def slurm_command(settings: TrainSettings, job_path: Path, run_id: str,
                  environ: dict[str, str] | None = None) -> list[str]:
    """`srun` one agent on each node of the current allocation. The flow runs on the allocation's
    first node, which hosts the rendezvous."""
    environ = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in environ:
        raise UserError("train.launcher slurm: not inside a Slurm allocation (no SLURM_JOB_ID); "
                        "start the Prefect worker with deployments/slurm/worker.sbatch or use "
                        "launcher: local")
    nodes = int(environ.get("SLURM_JOB_NUM_NODES", environ.get("SLURM_NNODES", "1")))
    if nodes < settings.nnodes:
        raise UserError(f"train.nnodes is {settings.nnodes} but the Slurm allocation has {nodes} "
                        "node(s); allocate more (sbatch --nodes) or lower train.nnodes")
    endpoint = f"{socket.gethostname()}:{settings.rdzv_port or SLURM_RDZV_PORT}"
    return ["srun", f"--nodes={settings.nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            f"--job-name=rsft-train-{run_id}", *settings.slurm.srun_args,
            *agent_command(settings, job_path, endpoint, run_id)]


def run_agents(commands: list[list[str]], log_path: Path, timeout: float, log) -> None:
    """Run the agents in their own process groups, node 0's output through an `AgentWatch`; kill
    every group on timeout, cancellation or when any agent fails. Raises as `AgentWatch.result`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    procs: list[subprocess.Popen] = []
    side_logs = []

    def kill_all() -> None:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    with AgentWatch(log_path, timeout, log) as watch:
        for command in commands:
            watch.note(f"$ {shlex.join(command)}")
        try:
            procs.append(subprocess.Popen(commands[0], stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, env=env,
                                          start_new_session=True,
                                          preexec_fn=die_with_parent()))
            for i, command in enumerate(commands[1:], 1):
                side_logs.append(open(log_path.with_name(f"{log_path.stem}.node{i}.log"), "a"))
                procs.append(subprocess.Popen(command, stdout=side_logs[-1],
                                              stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True,
                                              preexec_fn=die_with_parent()))
        except BaseException:
            kill_all()
            raise
        timer = threading.Timer(watch.remaining(), kill_all)
        timer.start()
        # One agent failing leaves the others waiting at a collective: end them all.
        watchdog = threading.Thread(target=_kill_all_when_one_fails, args=(procs, kill_all),
                                    daemon=True)
        watchdog.start()
        try:
            assert procs[0].stdout is not None
            watch.follow(procs[0].stdout)
            for p in procs:
                p.wait()
        except BaseException:  # cancelled: never leave ranks running
            kill_all()
            for p in procs:
                p.wait()
            raise
        finally:
            timer.cancel()
            for f in side_logs:
                f.close()
        returncode = next((p.returncode for p in procs if p.returncode), 0)
        watch.result(f"exit {returncode}" if returncode else None)


def _kill_all_when_one_fails(procs: list[subprocess.Popen], kill_all) -> None:
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            time.sleep(5)  # let the failing agent's error reach the log first
            kill_all()
            return
        time.sleep(0.5)
