"""Failure handling on a real Prefect API: transient network failures are retried (and only those),
a failed run notifies through a real notification block, a stage failing its verification rolls
back what it published."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from settings.models import RetrySettings
from tasks.retry import is_transient, retry_options
from tests.conftest import settled_task_runs
from tests.conftest import run_pipeline as run

pytestmark = pytest.mark.usefixtures("prefect_api")


class _Response:
    def __init__(self, status_code: int):
        self.status_code = status_code


def test_only_network_failures_and_retryable_statuses_are_transient():
    from huggingface_hub.errors import LocalEntryNotFoundError

    wrapped = LocalEntryNotFoundError("cannot find the snapshot")
    wrapped.__cause__ = ConnectionRefusedError(111, "Connection refused")
    assert is_transient(wrapped) and is_transient(TimeoutError())
    for status, transient in [(503, True), (429, True), (404, False), (401, False)]:
        error = RuntimeError("hub said no")
        error.response = _Response(status)
        assert is_transient(error) is transient
    assert not is_transient(ValueError("bad input")) and not is_transient(None)
    options = retry_options(RetrySettings(attempts=3, delay_seconds=2))
    assert options["retries"] == 3 and options["retry_delay_seconds"] == [2, 4, 8]


@pytest.mark.slow
def test_unreachable_hub_during_download_is_retried_then_one_line(tmp_path, monkeypatch):
    """A closed loopback port stands in for the Hub going away after the run was planned (the
    revision is a pinned commit, so planning needs no network)."""
    import inspect

    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    # huggingface_hub retries a refused connection itself (5 times, 1-8 s apart: 23 s a try)
    # before our retries see it: keep its retries, not its waits.
    for backoff in (_http.http_backoff, _http.http_stream_backoff, _http._http_backoff_base):
        defaults = inspect.unwrap(backoff).__kwdefaults__
        monkeypatch.setitem(defaults, "base_wait_time", 0.01)
        monkeypatch.setitem(defaults, "max_wait_time", 0.01)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    state, states, _ = run(tmp_path / "work", f"download.source=hf://org/model@{commit}",
                           "retries.attempts=1", "retries.delay_seconds=0", until="download")
    assert state.is_failed() and states == {"download": "Failed"}
    assert state.message.startswith("download: network failure after 2 attempts"), state.message
    assert "\n" not in state.message
    with get_client(sync_client=True) as client:
        flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        (task_run,) = settled_task_runs(client, flow_filter)
    assert task_run.run_count == 2  # the first try and one retry
    assert not list((tmp_path / "work" / "artifacts" / "download").glob("[!.]*"))


def test_a_user_mistake_is_not_retried(tmp_path, tiny_model_dir):
    state, states, _ = run(tmp_path / "work", f"download.source={tmp_path / 'absent'}",
                           "retries.delay_seconds=0", until="download")
    assert state.is_failed() and "does not exist" in state.message
    with get_client(sync_client=True) as client:
        flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        assert all(tr.run_count <= 1 for tr in settled_task_runs(client, flow_filter))


@pytest.fixture
def webhook_server():
    """A loopback HTTP endpoint recording what is POSTed to it."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def test_a_failed_run_notifies_through_its_notification_block(tmp_path, webhook_server):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    url, received = webhook_server
    CustomWebhookNotificationBlock(
        name="rsft-test", url=url, allow_private_urls=True,
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
    ).save("rsft-test-ops", overwrite=True)
    # `train` alone with nothing built: the run fails at once, with one line
    state, _, _ = run(tmp_path / "work", "notify.block=custom-webhook/rsft-test-ops",
                      only=["train"])
    assert state.is_failed()
    (message,) = received
    assert message["subject"].startswith("rsft: sft-pipeline run tiny-") and "Failed" in message["subject"]
    assert "is needed as input" in message["body"]
    # a run without notify.block sends nothing; a missing block is logged, never raised
    run(tmp_path / "work", only=["train"])
    state, _, _ = run(tmp_path / "work", "notify.block=custom-webhook/absent", only=["train"])
    assert state.is_failed() and "is needed as input" in state.message
    assert len(received) == 1


def test_failure_automations_are_valid_for_the_server(tmp_path):
    from prefect.events.schemas.automations import AutomationCore

    from flows.notify import automations

    specs = automations("00000000-0000-0000-0000-000000000001")
    parsed = [AutomationCore.model_validate(spec) for spec in specs]
    crashed = parsed[0]
    assert {"prefect.flow-run.Crashed", "prefect.flow-run.Failed"} <= crashed.trigger.expect
    assert str(crashed.actions[0].block_document_id).endswith("1")


def test_a_stage_failing_its_verification_is_rolled_back(tmp_path, monkeypatch):
    """A stage's artifact is published, then its own check fails → the artifact is withdrawn,
    the task fails with one line, and the next run builds it again."""
    from dataclasses import replace

    import tasks
    from tasks import patch_tokenizer

    def reject(manifest):
        raise ValueError(f"tokenizer in {manifest.dir.name} rejected")

    work = tmp_path / "work"
    monkeypatch.setitem(tasks.BY_NAME, "patch_tokenizer",
                        replace(patch_tokenizer.STAGE, verify=reject))
    state, states, _ = run(work)
    assert state.is_failed() and states["patch_tokenizer"] == "Failed"
    assert state.message.startswith("patch_tokenizer: the published artifact failed its "
                                    "verification (ValueError: tokenizer in "), state.message
    assert "withdrawn" in state.message
    assert not list((work / "artifacts" / "patch_tokenizer").glob("*/manifest.json"))
    assert not list((work / "artifacts" / "patch_tokenizer").glob("[!.]*"))
    assert list((work / "artifacts" / "download").glob("*/manifest.json"))  # committed before
    monkeypatch.undo()
    state, states, _ = run(work)
    assert state.is_completed()
    assert states == {"download": "Cached", "patch_tokenizer": "Completed"}
