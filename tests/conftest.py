"""Shared fixtures: real assets, a real Prefect API for the session, and helpers to run the CLI."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_ASSETS = ROOT.parent / "shared" / "assets"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
R1_TOKENIZER = ROOT / "examples" / "tokenizers" / "deepseek-r1-distill-qwen-1.5b"

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@pytest.fixture(scope="session")
def prefect_api():
    """One real (temporary) Prefect API server for all in-process flow runs of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def settled_task_runs(client, flow_run_filter, timeout: float = 60.0) -> list:
    """The flow runs' task runs once the API has recorded their final states (or `NotReady`:
    never started because an upstream stage failed).

    Prefect 3 reports task-run states as events the server records asynchronously (retrying
    when sqlite is busy), so right after a flow returns a task run can still lack its state,
    show an older one, or be missing: wait until all are final and two reads agree."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()
    deadline = time.monotonic() + timeout
    previous = None
    while True:
        runs = client.read_task_runs(flow_run_filter=flow_run_filter)
        snapshot = sorted((str(r.id), r.state_name, r.run_count) for r in runs)
        if snapshot == previous and all(r.state and (r.state.is_final() or r.state.name == "NotReady")
                                        for r in runs):  # NotReady: an upstream failed
            return runs
        if time.monotonic() > deadline:
            raise AssertionError(f"task runs not settled after {timeout:.0f} s: {snapshot}")
        previous = snapshot
        time.sleep(0.5)


@pytest.fixture
def r1_tokenizer_dir(tmp_path: Path) -> Path:
    """A writable copy of the real DeepSeek-R1-Distill-Qwen tokenizer files."""
    out = tmp_path / "tokenizer"
    shutil.copytree(R1_TOKENIZER, out)
    return out


@pytest.fixture(scope="session")
def patched_tokenizer(tmp_path_factory) -> Path:
    """The R1 tokenizer patched as the tiny preset does (`<short>`, full reasoning kept)."""
    from settings.loader import load_settings
    from tasks.patch_tokenizer import patch_folder

    out = tmp_path_factory.mktemp("patched") / "tokenizer"
    shutil.copytree(R1_TOKENIZER, out)
    patch_folder(out, load_settings("tiny", []).patch_tokenizer)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The built-in tiny Qwen2 as a plain HF folder (read-only for tests: copy before editing)."""
    from tasks.builtin_models import build_builtin

    out = tmp_path_factory.mktemp("tiny-qwen2")
    build_builtin("tiny-qwen2", out)
    return out


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict[str, str]:
    """Environment for `rsft` subprocesses: their own Prefect home (database migrated once)."""
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    env.pop("PREFECT_API_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def rsft(*args: str, cwd: Path, env: dict[str, str], timeout: int = 300,
         check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"rsft {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def full_disk(tmp_path: Path):
    """A real 1 MiB filesystem (tmpfs): writes past it fail with ENOSPC."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN) to fill a disk")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def make_hf_cache(cache: Path, repo: str, source: Path, commit: str = COMMIT,
                  names: list[str] | None = None, repo_type: str = "model") -> None:
    """The layout huggingface_hub writes: blobs by hash, snapshots of symlinks, refs/main.
    `names` are paths relative to `source` (default: its top-level files)."""
    repo_dir = cache / f"{repo_type}s--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for name in names or sorted(p.name for p in source.iterdir()):
        data = (source / name).read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache
