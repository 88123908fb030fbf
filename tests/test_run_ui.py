"""What a run shows in the Prefect UI, read back through a real Prefect API: the training's live
progress (ETA) and table, the loss chart inline, run names that say what differs from the preset,
and artifact keys of each run's own. (The pages themselves, in Chromium:
tests/test_operations_e2e.py.)"""

from __future__ import annotations

import base64
import json
import logging
import time
from pathlib import Path

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, FlowRunFilter,
                                            FlowRunFilterId)

from tasks import train
from tasks.artifacts import Manifest
from tests.conftest import run_key_prefix, run_pipeline

pytestmark = pytest.mark.usefixtures("prefect_api")


def _record(step: int, **extra) -> dict:
    return {"step": step, "loss": 12.0 - step, "lr": 1e-3, "grad_norm": 1.0, "tokens": 4000,
            "seconds": 10.0, "tokens_per_s": 400.0, "memory_gb": 0.5, **extra}


def test_eta_progress_line_and_live_rows():
    records = [_record(1, seconds=4.0), _record(2, seconds=6.0)]
    assert train.eta_seconds(records, 12) == 50.0  # 5 s a step, 10 steps to go
    assert train.progress_line(records, 12) == "step 2/12, ETA 0:00:50, loss 10.0000"
    assert train.progress_line([], 12) == "step 0/12, starting"
    assert train.progress_line([_record(12)], 12) == "step 12/12, done, loss 0.0000"
    assert [r["step"] for r in train.live_rows([_record(i) for i in range(1, 30)])] == \
        list(range(29, 19, -1))  # the last LIVE_ROWS, newest first
    rows = train.live_rows([_record(1), _record(2, val_loss=10.5)])
    assert rows == [{"step": 2, "loss": 10.0, "val_loss": 10.5, "lr": 1e-3, "tokens_per_s": 400.0},
                    {"step": 1, "loss": 11.0, "val_loss": None, "lr": 1e-3, "tokens_per_s": 400.0}]
    assert "val_loss" not in train.live_rows([_record(1)])[0]


def test_training_progress_and_live_table_update_while_it_runs(tmp_path):
    """The watcher the train stage runs, inside a real task run: while records arrive the
    progress artifact's description carries step/total and the ETA and the table the recent
    steps; after the last step, 100 % and `done`. Both are updated in place (one card each)."""
    metrics = tmp_path / "metrics.jsonl"
    seen: dict[str, str] = {}

    def read(client, flow_run_id, kind):
        (artifact,) = [a for a in client.read_artifacts(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run_id]))) if a.type == kind]
        return artifact

    @task
    def training():
        from prefect.runtime import flow_run

        watch = train._Watch(metrics, 4, logging.getLogger("test")).start()
        with metrics.open("a") as f:
            for r in (_record(1, seconds=3.0), _record(2, seconds=5.0)):
                f.write(json.dumps(r) + "\n")
            f.write('{"step": 3, "lo')  # the trainer is writing the next record
        time.sleep(train.TICK_SECONDS * 2.5)
        with get_client(sync_client=True) as client:
            seen["progress"] = read(client, flow_run.id, "progress").description
            seen["table"] = read(client, flow_run.id, "table").data
        metrics.write_text("".join(json.dumps(r) + "\n" for r in (
            _record(1, seconds=3.0), _record(2, seconds=5.0), _record(3),
            _record(4, val_loss=8.5))))
        watch.close()

    @flow
    def run():
        training()

    state = run(return_state=True)
    assert state.is_completed()
    assert seen["progress"] == "step 2/4, ETA 0:00:08, loss 10.0000"
    assert [r["step"] for r in json.loads(seen["table"])] == [2, 1]
    with get_client(sync_client=True) as client:
        flow_run_id = state.state_details.flow_run_id
        progress = read(client, flow_run_id, "progress")
        table = read(client, flow_run_id, "table")
        name = client.read_flow_run(flow_run_id).name
    assert progress.data == 100.0 and progress.description == "step 4/4, done, loss 8.0000"
    assert progress.key == f"{run_key_prefix(name)}train-progress"
    assert table.key == f"{run_key_prefix(name)}train-live"
    assert table.description.startswith("training: step 4/4, done, loss 8.0000, val loss 8.5000 "
                                        "(step 4)")
    assert json.loads(table.data)[0] == {"step": 4, "loss": 8.0, "val_loss": 8.5, "lr": 1e-3,
                                         "tokens_per_s": 400.0}


def test_the_loss_chart_is_inline_in_the_training_summary(tmp_path):
    records = [_record(i) for i in range(1, 5)] + [_record(5, val_loss=7.5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    train.plot_loss(records, tmp_path / "loss.png")
    manifest = Manifest(stage="train", key="k", version="2", path=str(tmp_path), key_material={},
                        files=[], content_hash="")
    text = train.markdown(manifest)
    assert "validation loss 7.5000 (step 5)" in text
    uri = text.split("![loss curve](", 1)[1].split(")", 1)[0]
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]) == (tmp_path / "loss.png").read_bytes()
    assert [r.get("val_loss") for r in train.report(manifest)][-1] == 7.5


def test_run_names_say_what_differs_and_each_run_keeps_its_own_artifacts(tmp_path: Path):
    first, _, keys1 = run_pipeline(tmp_path, "train.lr=5e-4", until="download")
    second, _, keys2 = run_pipeline(tmp_path, "train.lr=2e-4", until="download")
    assert "sft-pipeline-stages" in keys1 and keys1 == keys2  # relative to each run
    with get_client(sync_client=True) as client:
        runs = [client.read_flow_run(s.state_details.flow_run_id) for s in (first, second)]
        assert runs[0].name.startswith("tiny-lr5e-4-iters2-warmup1-save1-")
        assert runs[1].name.startswith("tiny-lr2e-4-iters2-warmup1-save1-")
        for run in runs:  # each run's summary, by its key: that run's, and only one
            key = f"{run_key_prefix(run.name)}sft-pipeline-stages"
            (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key])))
            assert artifact.flow_run_id == run.id


@pytest.mark.parametrize("steps, shown", [(12, list(range(1, 13))), (40, [*range(1, 40, 2), 40]),
                                          (41, [*range(1, 42, 2)])])
def test_the_train_report_shows_each_step_once_and_always_the_last(tmp_path, steps, shown):
    from types import SimpleNamespace

    from tasks.train import report

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0,
         "memory_gb": 1.0}) + "\n" for s in range(1, steps + 1)))
    assert [r["step"] for r in report(SimpleNamespace(dir=tmp_path))] == shown

