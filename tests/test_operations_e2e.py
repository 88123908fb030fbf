"""Operations end to end, as the README's Prefect section tells a newcomer: a real `prefect server
start`, `rsft deploy`, a process worker on `rsft-gpu-host`, `prefect deployment run …`, the weekly
schedule, and the flow run's page rendered by headless Chromium.

Everything runs from an isolated copy of the project (the files git would ship, no ../shared
beside it), so the worker's `rsft-work` lands in tmp and the run proves the shipped files suffice.
Screenshots of the flow-run page go to `$RSFT_TEST_ARTIFACTS`, else `test-artifacts/` at the
repository root (git-ignored); the test prints where.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import timezone
from pathlib import Path
from uuid import UUID

import psutil
import pytest

from megatron_bridge.launch import free_port
from tests.conftest import ROOT, settled_task_runs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800),
              pytest.mark.xdist_group("operations")]  # one server, worker and deployment run

STAGES = ["download", "patch_tokenizer", "convert", "dataset", "tokenize", "train", "export",
          "evaluate"]
ARTIFACTS_DIR = Path(os.environ.get("RSFT_TEST_ARTIFACTS") or ROOT / "test-artifacts")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclass
class Ops:
    project: Path
    api: str
    env: dict[str, str]
    logs: Path
    runs: dict[str, UUID] = field(default_factory=dict)

    def prefect(self, *args: str, timeout: int = 300) -> str:
        proc = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=self.project,
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}" \
                                     f"\n{proc.stderr[-3000:]}"
        return proc.stdout

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api)

    def tail(self, name: str, lines: int = 60) -> str:
        text = (self.logs / f"{name}.log").read_text(errors="replace")
        return f"--- {name} log (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])

    def run_deployment(self, name: str, *params: str) -> UUID:
        """`prefect deployment run NAME -p k=v …`; returns the flow run's id."""
        out = self.prefect("deployment", "run", name, *(a for p in params for a in ("-p", p)))
        return UUID(re.search(r"UUID: ([0-9a-f-]{36})", out).group(1))

    def wait(self, run_id: UUID, timeout: float) -> None:
        """Until the flow run is final; fails unless it is Completed."""
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                state = client.read_flow_run(run_id).state
                if state is not None and state.is_final():
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"flow run {run_id} still {state and state.name} after "
                                f"{timeout:.0f} s\n{self.tail('worker')}")
                time.sleep(2)
        assert state.is_completed(), f"flow run {run_id}: {state.name} {state.message}\n" \
                                     f"{self.tail('worker')}"

    def page(self, run_id: UUID) -> str:
        """The flow run's page in the UI this server serves."""
        return f"{self.api.removesuffix('/api')}/runs/flow-run/{run_id}"

    def wait_for_stage(self, run_id: UUID, stage: str, timeout: float) -> None:
        """Until the flow run's `stage` task run has started."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        deadline = time.monotonic() + timeout
        with self.client() as client:
            while not any(t.name == stage and t.state and t.state.name != "Pending"
                          for t in client.read_task_runs(flow_run_filter=FlowRunFilter(
                              id=FlowRunFilterId(any_=[run_id])))):
                state = client.read_flow_run(run_id).state
                assert not (state and state.is_final()), f"flow run {run_id} ended: {state.name}" \
                                                         f" {state.message}\n{self.tail('worker')}"
                assert time.monotonic() < deadline, f"{stage} never started\n{self.tail('worker')}"
                time.sleep(1)

    def stage_runs(self, run_id: UUID) -> list[tuple[str, str]]:
        """(stage, state name) of every stage task run in the flow run and its subflow runs."""
        from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId,
                                                    FlowRunFilterParentFlowRunId)

        with self.client() as client:
            subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])))
            ids = [run_id, *(r.id for r in subflows)]
            tasks = settled_task_runs(client, FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        return sorted((t.name, t.state.name) for t in tasks if t.name in STAGES)


def _copy_project(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / rel, dest / rel)


def _start(cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                **kwargs)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group and every descendant (flow runs start their own sessions),
    SIGKILL what is left after 20 s."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with suppress(ProcessLookupError, psutil.NoSuchProcess):
            os.killpg(os.getpgid(p.pid), signal.SIGTERM) if p.pid == proc.pid else p.terminate()
    _, alive = psutil.wait_procs(tree, timeout=20)
    for p in alive:
        with suppress(psutil.NoSuchProcess):
            p.kill()
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    """Server up, `rsft deploy` applied, a worker polling rsft-gpu-host; all torn down after."""
    tmp = tmp_path_factory.mktemp("ops")
    project = tmp / "isolated" / "reasoning-sft"
    _copy_project(project)
    assert not (project.parent.parent / "shared").exists()
    logs = tmp / "logs"
    logs.mkdir()
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1",
                COLUMNS="250")
    # `prefect server start` on its own port: set through the server's settings (not --port) so
    # the UI it serves talks to this API, not to the default :4200.
    server_env = {**base, "PREFECT_HOME": str(tmp / "server-home"),
                  "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port)}
    api = f"http://127.0.0.1:{port}/api"
    env = {**base, "PREFECT_HOME": str(tmp / "client-home"), "PREFECT_API_URL": api,
           "PYTHONPATH": str(project)}
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start([sys.executable, "-m", "prefect", "server", "start"],
                            logs / "server.log", cwd=tmp, env=server_env))
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert procs[0].poll() is None, (logs / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prefect server start: no /api/health in 240 s"
            time.sleep(1)
        deploy = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--gpus", "1"],
                                cwd=project, env=env, capture_output=True, text=True, timeout=600)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        # The worker polls every second, not every 10 s: each deployment run starts sooner.
        procs.append(_start([sys.executable, "-m", "prefect", "worker", "start", "--pool",
                             "rsft-gpu-host"], logs / "worker.log", cwd=project,
                            env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}))
        yield Ops(project, api, env, logs)
    finally:
        for proc in reversed(procs):
            _stop(proc)


LIVE_ITERS = 4
"""The first run's steps, watched in the browser while it trains: steps 1-3 show progress short
of the total for ~20 s, several of the UI's 5 s refreshes; step 4 validates."""
CHANGES = {"train": {"train_iters": LIVE_ITERS, "save_interval": LIVE_ITERS, "lr_warmup_iters": 1},
           "evaluate": {"max_problems": 2, "max_new_tokens": 16}}
SETTINGS = "settings=" + json.dumps(CHANGES)
"""Only what the test changes on the tiny deployment's preset — 4 training steps and a shorter
evaluation (the test's cost; a 12-step run proves nothing more here) — as `prefect deployment
run -p settings=…` takes it: the run merges it onto the preset."""


@dataclass
class Browser:
    """Headless Chromium on the flow-run pages (None where playwright or Chromium is missing),
    and where its screenshots go."""
    page: object
    shots: dict[str, Path]
    skip: str = ""


@pytest.fixture(scope="module")
def browser(ops: Ops):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        yield Browser(None, {}, "playwright is not installed (the `dev` extra has it: "
                                "pip install -e '.[dev]')")
        return
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        yield Browser(None, {}, "no Chromium executable (Debian: apt-get install -y chromium)")
        return
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    shots = {name: ARTIFACTS_DIR / f"operations-e2e-{name}.png"
             for name in ("flow-run", "task-runs", "artifacts", "training-progress",
                          "training-live-table", "loss-chart")}
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(ops.logs.parent / "chromium-profile"), executable_path=chromium, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1600, "height": 1400})
        try:
            yield Browser(context.new_page(), shots)
        finally:
            context.close()


@pytest.fixture(scope="module")
def first_run(ops: Ops, browser: Browser) -> UUID:
    """The deployment run of every stage; its training is watched on the flow-run page while
    it runs (where a browser is available)."""
    run_id = ops.run_deployment("sft-pipeline/tiny", SETTINGS)
    if browser.page is not None:
        ops.wait_for_stage(run_id, "train", timeout=10 * 60)
        _watch_training(browser.page, ops.page(run_id), browser.shots)
    ops.wait(run_id, timeout=15 * 60)
    return run_id


def test_deployment_run_builds_every_stage_through_the_worker(ops, first_run):
    assert ops.stage_runs(first_run) == sorted((s, "Completed") for s in STAGES)
    with ops.client() as client:
        deployment = client.read_deployment_by_name("sft-pipeline/tiny")
        assert client.read_flow_run(first_run).parameters == {"preset": "tiny",
                                                              "settings": CHANGES}
    # the partial override landed on the preset: the train job has both
    (job_file,) = (ops.project / "rsft-work").glob("scratch/train/*/job.json")
    job = json.loads(job_file.read_text())
    assert {k: job["train"][k] for k in CHANGES["train"]} == CHANGES["train"]
    assert (job["train"]["global_batch_size"], job["train"]["lr"], job["device"]) == (2, 1e-3, "cpu")
    (stats,) = (ops.project / "rsft-work").glob("artifacts/tokenize/*/stats.json")
    assert json.loads(stats.read_text())["seq_length"] == 2048  # tiny's, not the default 16384
    assert deployment.pull_steps[0]["prefect.deployments.steps.set_working_directory"] == {
        "directory": str(ops.project)}
    # the worker ran the flow in the project copy: its artifacts are there
    for stage in STAGES:
        assert list((ops.project / "rsft-work" / "artifacts" / stage).glob("*/manifest.json"))
    # the shipped eval copies suffice (no ../shared beside the project)
    (results,) = (ops.project / "rsft-work").glob("artifacts/evaluate/*/results.json")
    assert set(json.loads(results.read_text())["scores"]) == {"math_500_local", "aime24_local"}


def test_second_deployment_run_is_all_cached(ops, first_run):
    run_id = ops.run_deployment("sft-pipeline/tiny", SETTINGS)
    ops.wait(run_id, timeout=5 * 60)
    assert ops.stage_runs(run_id) == sorted((s, "Cached") for s in STAGES)


def test_rerun_stage_deployment_rebuilds_only_that_stage(ops, first_run):
    # a non-default stage (the deployment's default is evaluate), so the parameter must arrive
    run_id = ops.run_deployment("rerun-stage/tiny", SETTINGS, "stage=export")
    ops.wait(run_id, timeout=8 * 60)
    assert ops.stage_runs(run_id) == [("export", "Completed")]


def test_weekly_retrain_is_scheduled_mondays_0300_utc(ops):
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId,
                                                FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    listing = ops.prefect("deployment", "ls")
    assert "sft-pipeline/tiny-weekly-retrain" in listing, listing
    inspected = ops.prefect("deployment", "inspect", "sft-pipeline/tiny-weekly-retrain")
    assert "0 3 * * 1" in inspected and "UTC" in inspected, inspected
    # the server's scheduler service creates the upcoming runs
    deadline = time.monotonic() + 180
    with ops.client() as client:
        weekly = client.read_deployment_by_name("sft-pipeline/tiny-weekly-retrain")
        while True:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[weekly.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
            if runs or time.monotonic() > deadline:
                break
            time.sleep(5)
    assert runs, f"no scheduled run of tiny-weekly-retrain\n{ops.tail('server')}"
    for run in runs:
        start = run.expected_start_time.astimezone(timezone.utc)
        assert (start.weekday(), start.hour, start.minute) == (0, 3, 0), start


def _completed_green(png: bytes) -> int:
    """Pixels of the UI's Completed green (the task bars of the run graph)."""
    import io

    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((g > 120) & (g > r + 60) & (g > b + 30)).sum())


def test_flow_run_page_in_headless_chromium(ops, browser, first_run, capsys):
    """The first run's page: its training was watched live (`first_run`); once done, the run
    graph, the task runs, the artifacts and the loss chart."""
    if browser.page is None:
        pytest.skip(browser.skip)
    page, shots = browser.page, browser.shots
    assert shots["training-progress"].is_file() and shots["training-live-table"].is_file()
    page.goto(ops.page(first_run), wait_until="networkidle")
    # the run graph is a WebGL canvas: wait until its task bars are drawn
    deadline = time.monotonic() + 90
    while True:
        canvas = page.locator("canvas")
        if canvas.count() and _completed_green(canvas.first.screenshot()) > 2000:
            break
        assert time.monotonic() < deadline, "the flow-run graph never rendered"
        time.sleep(1)
    header = page.inner_text("body")
    assert "Completed" in header and "8 Task runs" in header, header[:2000]
    page.screenshot(path=shots["flow-run"], full_page=True)

    page.locator("li.p-tab", has_text="Task Runs").click()
    deadline = time.monotonic() + 60
    while not all(re.search(rf"^{s}$", page.inner_text("body"), re.M) for s in STAGES):
        assert time.monotonic() < deadline, page.inner_text("body")[-3000:]
        time.sleep(1)
    assert "(8 Completed)" in page.inner_text("body")
    page.screenshot(path=shots["task-runs"], full_page=True)

    page.locator("li.p-tab", has_text="Artifacts").click()
    wanted = {"sft-pipeline-stages", "train-report", "train-summary", "train-progress",
              "train-live", "export-report",
              "evaluate-report", "evaluate-summary", "tokenize-report", "convert-report"}
    deadline = time.monotonic() + 60
    while missing := {k for k in wanted if k not in page.inner_text("body")}:
        assert time.monotonic() < deadline, f"artifacts not listed: {missing}"
        time.sleep(1)
    page.screenshot(path=shots["artifacts"], full_page=True)
    _loss_chart_is_shown(page, shots)
    with capsys.disabled():
        print(f"\nflow-run page screenshots: {', '.join(map(str, shots.values()))}")


PROGRESS = re.compile(r"step (\d+)/(\d+), ETA \d+:\d\d:\d\d, loss \d+\.\d{4}")


def _watch_training(page, url: str, shots: dict[str, Path]) -> None:
    """While the run trains, its Artifacts tab shows the progress card with step/total and ETA
    and the live table's card; the table's page lists the recent steps."""
    page.goto(url, wait_until="networkidle")
    deadline = time.monotonic() + 8 * 60
    while True:
        tab = page.locator("li.p-tab", has_text="Artifacts")
        if tab.count():
            tab.click()
            cards = [page.locator("a", has_text=k) for k in ("train-progress", "train-live")]
            if all(c.count() for c in cards) and (m := PROGRESS.search(cards[0].first.inner_text())) \
                    and int(m[1]) < int(m[2]):
                break
        assert time.monotonic() < deadline, "no training progress with an ETA on the flow-run page"
        time.sleep(1)
    assert int(m[2]) == LIVE_ITERS, m[0]
    page.screenshot(path=shots["training-progress"], full_page=True)
    page.locator("a", has_text="train-live").first.click()
    deadline = time.monotonic() + 60
    while not all(c in (body := page.inner_text("body")) for c in ("step", "loss", "lr",
                                                                    "tokens_per_s")):
        assert time.monotonic() < deadline, body[-2000:]
        time.sleep(1)
    assert re.search(rf"training: step \d+/{LIVE_ITERS}", body), body[-2000:]
    page.screenshot(path=shots["training-live-table"], full_page=True)
    # Off the running flow's page while the run finishes: its animated graph, drawn in software
    # here, would take a core from the run and from every other test.
    page.goto("about:blank")


def _loss_chart_is_shown(page, shots: dict[str, Path]) -> None:
    """After training, the train summary's loss curve is an image the page has loaded."""
    page.reload(wait_until="networkidle")
    deadline = time.monotonic() + 60
    while True:
        tab = page.locator("li.p-tab", has_text="Artifacts")
        if tab.count():
            tab.click()
            link = page.locator("a", has_text="train-summary")
            if link.count():
                break
        assert time.monotonic() < deadline, "no train-summary artifact after training"
        time.sleep(1)
    link.first.click()
    chart = page.locator("img[alt='loss curve']")
    chart.wait_for(timeout=60_000)
    deadline = time.monotonic() + 30
    while not (width := chart.evaluate("img => img.complete ? img.naturalWidth : 0")):
        assert time.monotonic() < deadline, "the loss chart never loaded"
        time.sleep(0.5)
    assert width == 700  # loss.png: 7 × 3.5 in at 100 dpi
    chart.scroll_into_view_if_needed()
    page.screenshot(path=shots["loss-chart"], full_page=True)
