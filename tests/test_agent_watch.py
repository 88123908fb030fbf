"""The agent watcher every launcher shares (`tasks/agent_watch.py`): node 0's lines in, train.log,
the forwarded trainer lines and the run's outcome out; and the local launcher through it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from settings.errors import UserError
from tasks import train_launch
from tasks.agent_watch import TAIL_LINES, AgentWatch, latest_metrics


TIMEOUT_MESSAGE = ("timed out after 2 min (train.timeout_minutes); rerun to resume from the "
                   "latest checkpoint")


LINES = ["training: 1 node × 1 process, 2 steps\n",
         "[rank0]: building the model\n",
         "step 1/2 loss 11.93 lr 2.5e-04\n",
         "some library chatter",  # a stream's last line may lack its newline
         "step 2/2 loss 11.80 lr 5.0e-04\n"]


def test_lines_go_to_train_log_and_the_trainers_to_the_log(tmp_path: Path, log):
    with AgentWatch(tmp_path / "train.log", 120, log) as watch:
        watch.note("$ torchrun ...")
        watch.follow(LINES)
        watch.result(None)  # succeeded: nothing raised
    assert (tmp_path / "train.log").read_text().splitlines() == \
        ["$ torchrun ..."] + [line.rstrip("\n") for line in LINES]
    assert log.recorder.messages == ["train: training: 1 node × 1 process, 2 steps",
                                     "train: step 1/2 loss 11.93 lr 2.5e-04",
                                     "train: step 2/2 loss 11.80 lr 5.0e-04"]


def test_the_trainers_reported_mistake_is_the_user_error(tmp_path: Path, log):
    with AgentWatch(tmp_path / "train.log", 120, log) as watch:
        watch.follow([*LINES, "error: first mistake\n", "Traceback (most recent call last):\n",
                      "[rank0]: error: train.device is cuda but no GPU is visible\n",
                      "exit status 2\n"])
        assert watch.error == "train.device is cuda but no GPU is visible"  # the last one
        with pytest.raises(UserError) as err:
            watch.result("exit 2")
    assert str(err.value) == "train.device is cuda but no GPU is visible"


def test_a_failure_without_a_reported_mistake_shows_the_end_of_the_log(tmp_path: Path, log):
    lines = [f"line {i}\n" for i in range(100)] + ["RuntimeError: NCCL timeout\n"]
    with AgentWatch(tmp_path / "train.log", 120, log) as watch:
        watch.follow(lines)
        with pytest.raises(RuntimeError) as err:
            watch.result("exit 1")
    assert not isinstance(err.value, UserError)
    head, tail = str(err.value).split("\n", 1)
    assert head == f"training failed (exit 1); see {tmp_path / 'train.log'}:"
    assert tail.splitlines() == [line.rstrip() for line in lines[-TAIL_LINES:]]


def test_a_failure_past_the_deadline_is_the_timeout(tmp_path: Path, log):
    with AgentWatch(tmp_path / "train.log", 120, log) as watch:
        watch.follow(["step 1/2 loss 11.93\n", "error: not the cause\n"])
        watch.deadline -= 121  # the launcher killed the agents at the deadline
        assert watch.remaining() < 0
        with pytest.raises(UserError) as err:
            watch.result("exit -9")
        watch.result(None)  # finishing just past it is still a success
    assert str(err.value) == TIMEOUT_MESSAGE


def test_latest_metrics(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    assert latest_metrics(path) is None
    path.write_text("")
    assert latest_metrics(path) is None
    records = [{"step": i, "loss": 12.0 - i, "filler": "x" * 500} for i in range(1, 300)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert latest_metrics(path) == records[-1]
    with open(path, "a") as f:
        f.write('{"step": 300, "lo')  # the trainer is writing the next record
    assert latest_metrics(path) == records[-1]


# The local launcher: real agent processes, their output through the watcher.

def _agent(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_agents_reports_the_trainers_mistake(tmp_path: Path, log):
    agent = _agent("import sys; print('step 1/2 loss 1.0'); "
                   "print('error: train.lr = 5: too high', file=sys.stderr); sys.exit(2)")
    with pytest.raises(UserError, match=r"^train.lr = 5: too high$"):
        train_launch.run_agents([agent], tmp_path / "train.log", 60, log)
    assert log.recorder.messages == ["train: step 1/2 loss 1.0"]
    assert "error: train.lr = 5: too high" in (tmp_path / "train.log").read_text()


def test_run_agents_times_out(tmp_path: Path, log):
    agent = _agent("import time; print('step 1/2 loss 1.0', flush=True); time.sleep(600)")
    with pytest.raises(UserError) as err:
        train_launch.run_agents([agent], tmp_path / "train.log", 1.5, log)
    assert str(err.value) == TIMEOUT_MESSAGE.replace("2 min", "0 min")
    assert "step 1/2 loss 1.0" in (tmp_path / "train.log").read_text()
