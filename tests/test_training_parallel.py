"""The one training step under torchrun (gloo, 2 processes): every layout megatron-core offers
equals one process (training and validation loss), the distributed optimizer's weights include
the last update, and a kill -9 mid-run resumes bit-identically (plain and distributed optimizer,
with attention dropout), each step logged once in metrics.jsonl and every tracker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from megatron_bridge import compat
from megatron_bridge.training.job import TrainJob
from settings.models import TrainSettings
from tests.conftest import ROOT, exported, job, metrics, tiny_hf
from tests.trackers import (OFFLINE, READERS, assert_one_continued_run, assert_same,
                            expected_series)

pytestmark = pytest.mark.slow


def launch(j: TrainJob) -> subprocess.Popen:
    """The job's `train.nproc_per_node` processes under torchrun (one: a plain process)."""
    nproc = j.train.nproc_per_node
    path = Path(j.save).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    j.write(path)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    runner = ["-m", "tests.train_ranks", str(path)]
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
                             if nproc > 1 else []), *runner]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def train(j: TrainJob) -> str:
    """Runs the job to the end; its output."""
    proc = launch(j)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    path = Path(j.save).with_suffix(".json")
    for rank in range(j.train.nproc_per_node):
        sites = json.loads(Path(f"{path}.shims.rank{rank}.json").read_text())
        assert set(sites) <= set(compat.KNOWN_CALL_SITES), sites
    return out


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    """A tiny Qwen2 whose output layer is its embedding: under PP they live on different
    stages, and their gradients must be summed."""
    from megatron_bridge.convert import hf_to_mcore

    root = tmp_path_factory.mktemp("tied")
    out = root / "ckpt"
    hf_to_mcore(tiny_hf(root / "hf", "qwen2", tied=True), out, 1, 1)
    return out


@pytest.fixture(scope="module")
def one_process(converted, tied, held_out, tmp_path_factory):  # noqa: F811
    """The reference: one process (in this one), per model; validation loss at steps 2 and 4
    (3 test rows: uneven over two data-parallel ranks)."""
    from megatron_bridge.training.trainer import run

    runs = {}
    for name, ckpt in (("untied", converted), ("tied", tied)):
        # A small learning rate: Adam turns rounding noise in near-zero gradients into ±lr
        # steps, which would dominate the comparison; the last update (lr 1e-5) must not.
        j = job(ckpt, held_out, tmp_path_factory.mktemp("one") / name, lr=1e-4, min_lr=1e-5,
                eval_interval=2)
        run(j)
        runs[name] = (j, metrics(j))
    return runs


LAYOUTS = {
    "DP2": ("untied", {}),
    "TP2": ("untied", {"tensor_parallel": 2}),
    "PP2": ("untied", {"pipeline_parallel": 2}),
    "PP2-tied": ("tied", {"pipeline_parallel": 2}),
    "DP2-distributed-optimizer": ("untied", {"use_distributed_optimizer": True}),
}


@pytest.mark.xdist_group("one_process")  # the references are trained once
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_processes_match_one(one_process, tmp_path, layout):
    model, changes = LAYOUTS[layout]
    reference, expected = one_process[model]
    two = reference.model_copy(update={
        "save": str(tmp_path / "two"), "metrics": "",
        "train": TrainSettings(**{**reference.train.model_dump(), "nproc_per_node": 2, **changes})})
    train(two)
    got = metrics(two)
    assert len(got) == len(expected) == 4
    for a, b in zip(expected, got):
        # The global batch's tokens, counted once whatever the layout.
        assert (a["tokens"], a["supervised_tokens"]) == (b["tokens"], b["supervised_tokens"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), (a, b)
        # Validation: the same rows, each counted once, through every layout's forward.
        assert ("val_loss" in a) == ("val_loss" in b)
        if "val_loss" in a:
            assert a["val_tokens"] == b["val_tokens"]
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5), (a, b)
    assert [r["step"] for r in got if "val_loss" in r] == [2, 4]
    # Every parameter of the model, the last update included (the distributed optimizer's
    # overlapped all-gather would otherwise leave the other rank's shards one step behind).
    ours = exported(Path(two.save), tmp_path / "two-hf")
    theirs = exported(Path(reference.save), tmp_path / "one-hf")
    for name in theirs:
        assert torch.allclose(ours[name], theirs[name], atol=2e-6, rtol=0), name


KILLED = {
    # Killed after step 5 with the last checkpoint at 3: the trackers hold step 4 (logged before
    # step 5 ran), so the rerun trains and logs steps 4.. again.
    "plain-tracked": dict(nproc_per_node=1, train_iters=6, save_interval=3, eval_interval=2,
                          report_to=["tensorboard", "wandb", "mlflow"]),
    # Killed after step 3 with the last checkpoint at 2.
    "distributed-optimizer": dict(nproc_per_node=2, use_distributed_optimizer=True, train_iters=4,
                                  save_interval=2),
}


@pytest.mark.parametrize("case", list(KILLED))
def test_kill_9_and_rerun_gives_bit_identical_weights_and_each_step_once(
        converted, held_out, tmp_path, monkeypatch, case):  # noqa: F811
    """Killed the step after a checkpoint (and one more), the rerun resumes from it: its weights
    equal an uninterrupted run's bit for bit (attention dropout included), metrics.jsonl and
    every tracker hold each step once, in one tracking run."""
    settings = dict(keep_last=1, attention_dropout=0.1, **KILLED[case])
    steps, saved = settings["train_iters"], settings["save_interval"]
    for key, value in OFFLINE.items():  # the trainers' environment and this reader's
        monkeypatch.setenv(key, value)
    train(job(converted, held_out, tmp_path / "straight",
              **{k: v for k, v in settings.items() if k != "report_to"}))
    folder = tmp_path / "killed"
    killed = job(converted, held_out, folder / "checkpoints", metrics=str(folder / "metrics.jsonl"),
                 **settings)
    proc = launch(killed)
    deadline = time.time() + 300
    while not (killed.metrics_path.is_file()
               and len(killed.metrics_path.read_text().splitlines()) >= steps - 1):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    # The launcher's group: torchrun's ranks and W&B's service process die with it.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert not [r for r in alive if _alive(r)], "a rank outlived its torchrun agent"
    assert (folder / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == str(saved)
    tracked = settings.get("report_to", [])
    # What the rerun has to avoid duplicating: TensorBoard and MLflow are on disk as each step
    # is logged; W&B's service process writes asynchronously and may die before step 4 is in.
    for name in {"tensorboard", "mlflow"} & set(tracked):
        series = READERS[name](folder)["train/loss"]
        assert max(s for s, _ in series) > saved, (name, series)

    out = train(killed)  # resumes from the checkpoint
    assert "tracking:" not in out, out[-3000:]  # no tracker failed
    a = exported(tmp_path / "straight", tmp_path / "a")
    b = exported(folder / "checkpoints", tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in metrics(killed)] == list(range(1, steps + 1))  # each step once
    if tracked:
        want = expected_series(metrics(killed))
        assert [s for s, _ in want["val/loss"]] == [2, 4, 6]
        for name in tracked:
            assert_same(READERS[name](folder), want, name, timings=False)
        assert_one_continued_run(folder, sessions=2)
