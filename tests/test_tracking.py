"""Experiment tracking of training runs, read back with each tracker's own reader
(tests/trackers.py): every step once, validation points at the interval, the values of
metrics.jsonl — also when a run is reopened after a kill. (A real kill -9 and the rerun that
resumes: tests/test_training_parallel.py.)"""

from __future__ import annotations

import json

import pytest

from megatron_bridge.training import tracking
from settings.errors import UserError
from tests.conftest import job, metrics
from tests.trackers import (OFFLINE, READERS, TRAIN, VAL, assert_same, expected_series,
                            wandb_id)


@pytest.fixture
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


def test_every_tracker_holds_each_step_once_and_validation_at_the_interval(
        converted, held_out, tmp_path, offline):
    from megatron_bridge.training.trainer import run

    j = job(converted, held_out, tmp_path / "run" / "checkpoints",
            metrics=str(tmp_path / "run" / "metrics.jsonl"), train_iters=5, eval_interval=2,
            report_to=["tensorboard", "wandb", "mlflow"])
    run(j)
    records = metrics(j)
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4, 5]  # and after the last
    want = expected_series(records)
    assert set(want) == {*TRAIN, *VAL}
    assert [s for s, _ in want["train/loss"]] == [1, 2, 3, 4, 5]
    for name, read in READERS.items():
        assert_same(read(tmp_path / "run"), want, name)
    # The W&B run is an offline run of the configured project and name, in the scratch folder.
    (session,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert session.name.endswith(json.loads((tmp_path / "run" / "tracking.json").read_text())
                                 ["wandb"]["id"])


@pytest.mark.parametrize("lost", [False, True], ids=["kept", "wandb-lost-its-points"])
def test_a_reopened_run_continues_without_repeating_steps(tmp_path, offline, lost):
    """The resume protocol alone: a session logs steps 1-5 and ends (a kill after step 5 was
    written), the next starts from checkpoint 3 and logs 4-7 again with the same values: each
    tracker then holds 1-7 once, in one run — also when W&B lost the first session's points
    (its writer is a separate process a kill -9 takes down): they come from `metrics.jsonl`."""
    from settings.models import TrainSettings

    settings = TrainSettings(report_to=["tensorboard", "wandb", "mlflow"])
    value = {step: {"train/loss": 10.0 / step, **({"val/loss": 1.0 / step} if step % 2 == 0
                                                 else {})} for step in range(1, 8)}
    for start, steps in ((0, range(1, 6)), (3, range(4, 8))):
        trackers = tracking.open_trackers(settings, tmp_path, "resumed", start)
        assert [b.name for b in trackers.backends] == ["tensorboard", "wandb", "mlflow"]
        trackers.catch_up({s: value[s] for s in range(1, start + 1)})  # held: nothing logged
        for step in steps:
            trackers.log(step, value[step])
        trackers.close()
        if lost and start == 0:
            # W&B's service process died before writing anything of the first session.
            for log in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb"):
                log.write_bytes(log.read_bytes()[:7])
            assert tracking.wandb_history(tmp_path / "wandb", wandb_id(tmp_path)) == []
    want = {"train/loss": [(s, value[s]["train/loss"]) for s in range(1, 8)],
            "val/loss": [(s, value[s]["val/loss"]) for s in (2, 4, 6)]}
    for name, read in READERS.items():
        assert_same(read(tmp_path), want, name)
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2  # the same id twice


def test_a_session_reopened_within_the_same_second_still_replaces_the_later_steps(tmp_path,
                                                                                 monkeypatch):
    """TensorBoard reads event files in name order — `<second>.<host>.<pid>.<n>`, n counting the
    process's writers: a session reopened in the same second whose n went from 9 to 10 would
    sort before the first session's file, and its purge would miss (seen in a test process)."""
    import itertools

    from tensorboard.summary.writer import event_file_writer

    from settings.models import TrainSettings

    counter = itertools.count(9)
    monkeypatch.setattr(event_file_writer._global_uid, "get", lambda: next(counter))
    settings = TrainSettings(report_to=["tensorboard"])
    for start, steps in ((0, range(1, 6)), (3, range(4, 8))):
        trackers = tracking.open_trackers(settings, tmp_path, "resumed", start)
        for step in steps:
            trackers.log(step, {"train/loss": 10.0 / step})
        trackers.close()
    assert [s for s, _ in READERS["tensorboard"](tmp_path)["train/loss"]] == list(range(1, 8))


def test_a_tracker_that_fails_is_reported_once_and_training_goes_on(converted, data, tmp_path,
                                                                    capfd):
    from megatron_bridge.training.trainer import run

    j = job(converted, data, tmp_path / "run" / "checkpoints", train_iters=2,
            metrics=str(tmp_path / "run" / "metrics.jsonl"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tensorboard").write_text("a file where the event folder goes")
    run(j)
    assert [r["step"] for r in metrics(j)] == [1, 2]
    err = capfd.readouterr().err
    assert err.count("tracking: tensorboard failed") == 1, err[-2000:]


def test_a_tracker_not_installed_is_one_line_before_training(converted, data, tmp_path,
                                                             monkeypatch):
    import importlib.util

    from megatron_bridge.training.trainer import run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    j = job(converted, data, tmp_path / "save", report_to=["tensorboard", "wandb"])
    with pytest.raises(UserError) as e:
        run(j)
    assert str(e.value) == ("train.report_to asks for wandb, which is not installed: "
                            "pip install 'reasoning-sft[tracking]' (or remove it from "
                            "train.report_to)")
    assert not j.metrics_path.exists()


def test_validation_without_a_test_split_is_refused_before_training(converted, data, tmp_path):
    from megatron_bridge.training.trainer import run
    from settings.loader import load_settings

    with pytest.raises(UserError, match=r"train.eval_interval=2 needs held-out rows: set "
                                        r"dataset.test_split"):
        load_settings("tiny", ["train.eval_interval=2", "dataset.test_split=0"])
    j = job(converted, data, tmp_path / "save", eval_interval=2)  # data: no test split
    with pytest.raises(UserError, match=r"train.eval_interval=2 needs a test split, and the "
                                        r"data has none: set dataset.test_split"):
        run(j)
    assert not j.metrics_path.exists()


def test_a_checkpoints_scores_join_its_training_run_without_touching_the_training_points(
        tmp_path, offline, log):
    """`evaluate` logs `eval/<task>/<metric>` at the checkpoint's step into the run training
    wrote (after it, and possibly after later steps): nothing of the run's is purged or skipped."""
    from megatron_bridge.training.job import TrainJob
    from settings.models import TrainSettings
    from tasks.evaluate import log_scores

    folder = tmp_path / "run"
    folder.mkdir()
    train = TrainSettings(device="cpu", report_to=["tensorboard", "mlflow"])
    TrainJob(train=train, checkpoint="c", data="d", save=str(folder / "checkpoints"),
             device="cpu").write(folder / "job.json")
    trackers = tracking.open_trackers(train, folder, "run", 0)
    for step in range(1, 13):
        trackers.log(step, {"train/loss": 1.0 / step})
    trackers.close()
    rows = [{"task": "math_500_local", "metric": "pass@k:k=1&n=2", "value": 0.25}]
    assert log_scores(folder, 12, rows, log) and log_scores(folder, 6, rows, log)
    for name in ("tensorboard", "mlflow"):
        series = READERS[name](folder)
        assert [s for s, _ in series["train/loss"]] == list(range(1, 13)), name
        key = "eval/math_500_local/pass@k:k=1&n=2"
        key = tracking.mlflow_name(key) if name == "mlflow" else key  # MLflow's allowed characters
        assert sorted(series[key]) == [(6, 0.25), (12, 0.25)], name

