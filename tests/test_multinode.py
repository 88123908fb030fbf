"""Multi-node launch: two torchrun agents as `--nnodes 2` on loopback (gloo) train the tiny model
exactly as one process does; one agent failing ends the job; the Slurm command and template."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest

from settings.errors import UserError
from settings.models import TrainSettings
from tasks import train_launch
from tests.conftest import ROOT, job, metrics


LOG = logging.getLogger("test")


def two_nodes(**kw) -> TrainSettings:
    return TrainSettings(**{"device": "cpu", "nnodes": 2, "nproc_per_node": 1,
                            "global_batch_size": 4, "micro_batch_size": 1, **kw})


@pytest.mark.slow
def test_two_agents_as_two_nodes_train_like_one_process(converted, data, tmp_path):  # noqa: F811
    from megatron_bridge.training.trainer import run

    reference = job(converted, data, tmp_path / "one")
    run(reference)
    one = metrics(reference)
    two = job(converted, data, tmp_path / "two", nnodes=2)
    two.write(tmp_path / "two.json")
    commands = train_launch.local_commands(two_nodes(), tmp_path / "two.json", "rsft-test")
    assert len(commands) == 2 and all("--nnodes" in c and "c10d" in c for c in commands)
    train_launch.run_agents(commands, tmp_path / "train.log", 600, LOG)
    log = (tmp_path / "train.log").read_text()
    assert "2 processes" in log, log
    assert (tmp_path / "train.node1.log").is_file()  # the second agent ran, with its own log
    got = metrics(two)
    assert len(got) == len(one) == 4
    for a, b in zip(one, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
        assert a["supervised_tokens"] == b["supervised_tokens"]


def test_one_failing_agent_ends_the_whole_job(converted, data, tmp_path):  # noqa: F811
    j = job(converted, data, tmp_path / "save", nnodes=2)
    j.write(tmp_path / "job.json")
    node0, _ = train_launch.local_commands(two_nodes(), tmp_path / "job.json", "rsft-fail")
    dead = [sys.executable, "-c", "import sys; print('node 1 lost'); sys.exit(3)"]
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="training failed"):
        train_launch.run_agents([node0, dead], tmp_path / "train.log", 600, LOG)
    # node 0 would wait for its peer at the rendezvous for many minutes; the launcher ends it
    assert time.monotonic() - start < 60
    assert "node 1 lost" in (tmp_path / "train.node1.log").read_text()
    leftover = subprocess.run(["pgrep", "-f", "rsft-fail"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


def test_local_agents_on_a_gpu_host_each_get_their_own_gpus(tmp_path):
    settings = two_nodes(nproc_per_node=2)
    commands = train_launch.local_commands(settings, tmp_path / "j.json", "x", ["0", "1", "2", "3"])
    assert [c[:2] for c in commands] == [["env", "CUDA_VISIBLE_DEVICES=0,1"],
                                         ["env", "CUDA_VISIBLE_DEVICES=2,3"]]
    assert all(c[2:] == commands[0][2:] for c in commands)  # the same agent otherwise
    with pytest.raises(UserError, match="nnodes × nproc_per_node = 4 GPUs, this host has 3"):
        train_launch.local_commands(settings, tmp_path / "j.json", "x", ["0", "1", "2"])
    cpu = train_launch.local_commands(settings, tmp_path / "j.json", "x")
    assert all(c[:2] == ["env", "CUDA_VISIBLE_DEVICES="] for c in cpu)  # a CPU job sees no GPU


def test_slurm_runs_one_agent_per_node_of_the_allocation(tmp_path):
    settings = two_nodes(launcher="slurm", slurm={"srun_args": ["--gpus-per-node=8"]})
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2"}
    cmd = train_launch.slurm_command(settings, tmp_path / "job.json", "rsft-abc", env)
    assert cmd[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--gpus-per-node=8" in cmd
    agent = cmd[cmd.index("--gpus-per-node=8") + 1:]
    assert agent[1:3] == ["-m", "torch.distributed.run"]
    endpoint = agent[agent.index("--rdzv_endpoint") + 1]
    assert endpoint.endswith(":29500") and agent[-1] == str(tmp_path / "job.json")
    with pytest.raises(UserError, match="not inside a Slurm allocation"):
        train_launch.slurm_command(settings, tmp_path / "job.json", "x", {})
    with pytest.raises(UserError, match="allocation has 1 node"):
        train_launch.slurm_command(settings, tmp_path / "job.json", "x",
                                   {"SLURM_JOB_ID": "1", "SLURM_JOB_NUM_NODES": "1"})


def test_slurm_worker_template_is_valid_bash():
    template = ROOT / "deployments" / "slurm" / "worker.sbatch"
    subprocess.run(["bash", "-n", str(template)], check=True)
    text = template.read_text()
    assert "#SBATCH --nodes=" in text and "prefect worker start --pool rsft-cluster" in text
