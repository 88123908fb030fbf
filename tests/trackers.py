"""Each tracker's own reader, for the tests of tracked training runs: TensorBoard's event files
(`EventAccumulator`), a W&B offline run (its transaction log), an MLflow file store
(`MlflowClient.get_metric_history`); what metrics.jsonl says they must hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_bridge.training import tracking

TRAIN = ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
         "train/supervised_tokens", "train/memory_gb")
VAL = ("val/loss", "val/tokens")

OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_ALLOW_FILE_STORE": "true"}
"""W&B without network or account; MLflow's file store allowed in the reading process too."""


def tensorboard_series(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def wandb_id(folder: Path) -> str:
    return json.loads((folder / "tracking.json").read_text())["wandb"]["id"]


def wandb_series(folder: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in tracking.wandb_history(folder / "wandb", wandb_id(folder)):
        for key, value in row.items():
            if not key.startswith("_") and key != "step":
                series.setdefault(key, []).append((row["step"], value))
    # The W&B app draws by the step metric; a step lost to a kill comes back later in the log.
    return {key: sorted(points) for key, points in series.items()}


def mlflow_series(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    state = json.loads((folder / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    run = client.get_run(state["run_id"])
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics}


READERS = {"tensorboard": tensorboard_series, "wandb": wandb_series, "mlflow": mlflow_series}


def expected_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    from megatron_bridge.training.trainer import TRACKED

    return {name: [(r["step"], r[key]) for r in records if key in r]
            for key, name in TRACKED.items() if any(key in r for r in records)}


TIMINGS = ("train/tokens_per_s", "train/memory_gb")
"""Measured, not computed: a step trained again after a kill keeps its first timing in the
trackers that skip steps they hold, and has the new one in metrics.jsonl."""


def assert_same(got: dict, want: dict, tracker: str, timings: bool = True) -> None:
    assert set(got) == set(want), (tracker, sorted(got), sorted(want))
    for key, points in want.items():
        assert [s for s, _ in got[key]] == [s for s, _ in points], (tracker, key, got[key])
        if key in TIMINGS and not timings:
            continue
        # TensorBoard keeps float32 (1e-7 relative); tokens/s, memory: the rounded record
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in points], rel=1e-6), \
            (tracker, key)


def assert_one_continued_run(folder: Path, sessions: int) -> None:
    """One tracking run per tracker however many sessions wrote it: the same W&B id in each
    session, a TensorBoard event file per session, one finished MLflow run."""
    from mlflow.tracking import MlflowClient

    assert len(list((folder / "wandb").glob("offline-run-*"))) == sessions
    assert len(list((folder / "tensorboard").glob("events.out.tfevents.*"))) == sessions
    state = json.loads((folder / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    (experiment,) = [e for e in client.search_experiments() if e.name == "reasoning-sft"]
    (only,) = client.search_runs([experiment.experiment_id])
    assert only.info.run_id == state["run_id"] and only.info.status == "FINISHED"
