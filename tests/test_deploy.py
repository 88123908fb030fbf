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


def test_deployment_settings_are_the_presets():
    spec = yaml.safe_load(PREFECT_FILE.read_text())
    for deployment in spec["deployments"]:
        settings = deployment["parameters"]["settings"]
        assert PipelineSettings.model_validate(settings) == load_settings(settings["name"]), \
            f"{deployment['name']}: edit deployments/prefect.yaml to match its preset"


@pytest.mark.slow
def test_rsft_deploy_applies_pools_limit_deployments_and_schedule(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--gpus", "2"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with get_client(sync_client=True) as client:
        assert {p.name for p in client.read_work_pools()} >= {"rsft-gpu-host", "rsft-cluster"}
        assert client.read_global_concurrency_limit_by_name("gpu").limit == 2
        tiny = client.read_deployment_by_name("sft-pipeline/tiny")
        assert tiny.parameters["settings"]["name"] == "tiny"
        assert tiny.pull_steps[0]["prefect.deployments.steps.set_working_directory"] == {
            "directory": str(ROOT)}
        rerun = client.read_deployment_by_name("rerun-stage/tiny")
        assert rerun.parameters["stage"] == "evaluate"
        weekly = client.read_deployment_by_name("sft-pipeline/tiny-weekly-retrain")
        (schedule,) = weekly.schedules
        assert schedule.active and schedule.schedule.cron == "0 3 * * 1"
        client.read_deployment_by_name("sft-pipeline/thinkless-warmup-1.5b")
        # parameters are the typed settings: an invalid one is refused when the run is created
        with pytest.raises(Exception, match="lr|greater"):
            client.create_flow_run_from_deployment(
                tiny.id, parameters={"settings": {**tiny.parameters["settings"],
                                                  "train": {"lr": -1.0}}})
    # Applying again changes nothing that exists.
    again = subprocess.run([sys.executable, "-m", "flows.cli", "deploy"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert "created work pool" not in again.stdout and "created concurrency" not in again.stdout
