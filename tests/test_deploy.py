"""deployments/prefect.yaml and `rsft deploy`, applied to a real Prefect API."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from flows.deploy import PREFECT_FILE, ROOT
from settings.loader import load_settings
from settings.models import PipelineSettings


def test_deployments_name_a_preset_and_change_no_setting():
    """A deployment is a preset; a run's `settings` parameter is only what that run changes (a
    `settings` in the deployment would be replaced whole by any run that gives one)."""
    spec = yaml.safe_load(PREFECT_FILE.read_text())
    for deployment in spec["deployments"]:
        parameters = deployment["parameters"]
        assert "settings" not in parameters, deployment["name"]
        assert load_settings(parameters["preset"]).name == parameters["preset"]


def test_a_partial_settings_override_runs_on_the_deployments_preset(prefect_api, tmp_path):
    """A deployment run created with `-p settings='{"train": {...}}'` (the server merges run
    parameters over the deployment's, top-level keys only) runs with the preset's settings plus
    that change; a mistake in it fails the run at its start with one line."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    from flows.pipeline import sft_pipeline

    deployment_id = sft_pipeline.to_deployment(
        name="partial-override", parameters={"preset": "tiny"}).apply()
    override = {"workdir": str(tmp_path), "train": {"train_iters": 20, "lr": 2e-4}}
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(
            deployment_id, parameters={"settings": override, "until": "dataset"})
        assert run.parameters == {"preset": "tiny", "settings": override, "until": "dataset"}
        state = run_flow(sft_pipeline, flow_run=run, parameters=run.parameters,
                         return_type="state")
        assert state.is_completed(), state.message
        (artifact,) = [a for a in client.read_artifacts()  # the server's: other runs' too
                       if a.flow_run_id == run.id and (a.key or "").endswith("-sft-pipeline-settings")]
        assert client.read_flow_run(run.id).name.startswith("tiny-")
    resolved = PipelineSettings.model_validate(
        yaml.safe_load(artifact.data.split("```yaml\n", 1)[1].split("```", 1)[0]))
    expected = load_settings("tiny", [f"workdir={tmp_path}", "train.train_iters=20",
                                      "train.lr=2e-4"])
    assert resolved == expected
    assert (resolved.tokenize.seq_length, resolved.train.device, resolved.dataset.test_split,
            resolved.train.lr_warmup_iters) == (2048, "cpu", 4, 4)  # the preset's, kept
    assert "`train.train_iters`, `train.lr`" in artifact.data
    assert (tmp_path / "artifacts" / "dataset").is_dir()

    with get_client(sync_client=True) as client:
        bad = client.create_flow_run_from_deployment(deployment_id, parameters={
            "settings": {"workdir": str(tmp_path / "bad"), "train": {"lr": -1.0}}})
        state = run_flow(sft_pipeline, flow_run=bad, parameters=bad.parameters,
                         return_type="state")
    assert state.is_failed() and state.message == (
        "settings parameter: train.lr = -1.0: Input should be greater than 0")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_rsft_deploy_applies_pools_limit_deployments_and_schedule(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    CustomWebhookNotificationBlock(name="ops", url="http://127.0.0.1:9/hook").save(
        "rsft-deploy-ops", overwrite=True)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--gpus", "2", "--notify",
                           "custom-webhook/rsft-deploy-ops"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with get_client(sync_client=True) as client:
        assert {p.name for p in client.read_work_pools()} >= {"rsft-gpu-host", "rsft-cluster"}
        assert client.read_global_concurrency_limit_by_name("gpu").limit == 2
        tiny = client.read_deployment_by_name("sft-pipeline/tiny")
        assert tiny.parameters == {"preset": "tiny"}
        assert tiny.pull_steps[0]["prefect.deployments.steps.set_working_directory"] == {
            "directory": str(ROOT)}
        rerun = client.read_deployment_by_name("rerun-stage/tiny")
        assert rerun.parameters["stage"] == "evaluate"
        weekly = client.read_deployment_by_name("sft-pipeline/tiny-weekly-retrain")
        (schedule,) = weekly.schedules
        assert schedule.active and schedule.schedule.cron == "0 3 * * 1"
        client.read_deployment_by_name("sft-pipeline/thinkless-warmup-1.5b")
        block = client.read_block_document_by_name("rsft-deploy-ops", "custom-webhook")
        (crashed,) = client.read_automations_by_name("rsft-run-failed-or-crashed")
        assert "prefect.flow-run.Crashed" in crashed.trigger.expect
        assert crashed.actions[0].block_document_id == block.id
        assert client.read_automations_by_name("rsft-run-stuck-pending")
        # `settings` is a mapping of changes (checked when the run starts): anything else is
        # refused when the run is created
        with pytest.raises(Exception, match="settings|object|dict"):
            client.create_flow_run_from_deployment(tiny.id, parameters={"settings": "fast"})
    # Applying again changes nothing that exists.
    again = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--notify",
                            "custom-webhook/rsft-deploy-ops"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert not [line for line in again.stdout.splitlines() if line.startswith("created ")]
    missing = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--notify",
                              "custom-webhook/absent"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2 and "no Prefect block 'custom-webhook/absent'" in missing.stderr


def test_gpu_stages_of_two_runs_take_turns_under_the_gpu_limit(prefect_api, tmp_path):
    """Two runs whose stage needs the only GPU slot: the second waits for the first."""
    import threading
    import time

    from contextlib import suppress

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from settings.models import TrainSettings
    from tasks.stage import GPU_LIMIT, Stage, ensure_gpu_limit, plan_key, stage_task

    spans: list[tuple[float, float]] = []

    def build(ctx):
        start = time.monotonic()
        time.sleep(5)
        (ctx.out / "weights").write_text("trained")
        spans.append((start, time.monotonic()))

    stage = Stage(name="gpu_work", version="1", settings=lambda s: s.train, build=build,
                  gpus=lambda section: 1)
    section = TrainSettings()
    plan = plan_key(stage, section, {})

    @flow
    def one_run(workdir: str) -> None:
        stage_task(stage=stage, section=section, plan=plan, upstream={}, workdir=workdir,
                   force=True)

    with get_client(sync_client=True) as client, suppress(ObjectNotFound):
        client.delete_global_concurrency_limit_by_name(GPU_LIMIT)  # another test's, if any
    assert ensure_gpu_limit(1)
    try:
        runs = [threading.Thread(target=one_run, args=(str(tmp_path / f"w{i}"),)) for i in range(2)]
        for t in runs:
            t.start()
        for t in runs:
            t.join(120)
    finally:
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(GPU_LIMIT)
    assert len(spans) == 2
    (a_start, a_end), (b_start, b_end) = sorted(spans)
    assert b_start >= a_end - 0.05, f"overlapping GPU stages: {spans}"
