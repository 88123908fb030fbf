"""What the crash drills (benchmarks/chaos.py) check after a kill and a rerun: whether each
artifact equals the uninterrupted run's, and which stage processes outlived the flow."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path

from tasks.artifacts import ArtifactStore, Manifest

SERVER_MARK = "uvicorn"
"""Prefect's ephemeral API server, a child of `rsft run` in the same process group."""
TMP_NAME = re.compile(r"\.tmp-([0-9a-f]{16})-\d+-[0-9a-f]{8}")

# Content files that differ between two uninterrupted runs, and how they are compared instead.
VOLATILE: list[tuple[str, str, str]] = [
    # (stage glob, file glob, rule)
    ("evaluate", "job.json", "paths"),
    ("evaluate", "results.json", "paths"),
    ("evaluate", "lighteval/results/*/results_*.json", "lighteval-results"),
]
RULE_WHY = {
    "record": "records of the build (logs, timings): outside the content hash",
    "paths": "absolute workdir/temp paths (compared with them normalised)",
    "lighteval-results": "lighteval's own results file: timestamp in its name and timings",
}


# -- comparing artifacts ---------------------------------------------------------------------------
def _rule(stage: str, path: str) -> str | None:
    return next((r for s, f, r in VOLATILE if fnmatch(stage, s) and fnmatch(path, f)), None)


def _name(stage: str, path: str) -> str:
    """The file's name for matching across runs (lighteval timestamps its results file)."""
    if _rule(stage, path) == "lighteval-results":
        return re.sub(r"results_[^/]*\.json$", "results_*.json", path)
    return path


def _normalised(path: Path, root: Path) -> str:
    """A `paths` file with the workdir and temp dir names replaced."""
    return TMP_NAME.sub(r"\1", path.read_text().replace(str(root), "<workdir>"))


def compare(stage: str, base: Manifest, other: Manifest, base_root: Path, other_root: Path
            ) -> tuple[str, list[str]]:
    """`hash` (same content_hash), `equal*` (differs only in VOLATILE parts: returned), or
    `DIFF` (with what differs)."""
    if base.content_hash == other.content_hash:
        return "hash", []
    if base.meta != other.meta:
        keys = sorted(k for k in set(base.meta) | set(other.meta)
                      if base.meta.get(k) != other.meta.get(k))
        return "DIFF", [f"meta {', '.join(keys)}"]
    a = {_name(stage, f.path): f for f in base.files}
    b = {_name(stage, f.path): f for f in other.files}
    if set(a) != set(b):
        return "DIFF", [f"files {sorted(set(a) ^ set(b))}"]
    volatile, diff = [], []
    for name in sorted(a):
        if a[name].sha256 == b[name].sha256:
            continue
        rule = "record" if a[name].record else _rule(stage, a[name].path)
        if rule == "paths":
            same = (_normalised(base.dir / a[name].path, base_root)
                    == _normalised(other.dir / b[name].path, other_root))
        else:
            same = rule is not None
        (volatile if same else diff).append(f"{name} ({rule})" if rule else name)
    return ("DIFF", diff) if diff else ("equal*", volatile)


def verify_all(workdir: Path, keys: dict[str, str]) -> dict[str, Manifest | str]:
    """Every stage's artifact re-hashed (what `rsft run --verify` checks): manifest or why not."""
    store = ArtifactStore(workdir)
    out: dict[str, Manifest | str] = {}
    for stage, key in keys.items():
        manifest, why = store.check(stage, key, verify=True)
        out[stage] = manifest if manifest is not None else why
    return out


# -- processes -------------------------------------------------------------------------------------
def _psutil():
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil ships with megatron-core's requirements here
        sys.exit("the crash drills need psutil (pip install psutil)")
    return psutil


def cmdline(p) -> str:
    try:
        return " ".join(p.cmdline())
    except _psutil().Error:
        return "?"


def _alive(p) -> bool:
    psutil = _psutil()
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def descendants(pid: int) -> list:
    psutil = _psutil()
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stage_children(pid: int) -> list:
    """The flow's own children that run a stage's program (not Prefect's API server). A child
    forked but not yet exec'd still shows the flow's command line: it is not the stage's
    program yet, and killing it would test something else."""
    psutil = _psutil()
    try:
        flow = psutil.Process(pid)
        own, children = cmdline(flow), flow.children()
    except psutil.NoSuchProcess:
        return []
    return [p for p in children if cmdline(p) not in (own, "?") and SERVER_MARK not in cmdline(p)]


def survivors(snapshot: Iterable, workdir: Path) -> tuple[list, list]:
    """(stage processes, Prefect servers) still running after the flow died: from the snapshot
    of its descendants taken before the kill, plus anything whose command line names the drill's
    workdir."""
    psutil = _psutil()
    seen = {p.pid: p for p in snapshot if _alive(p)}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if str(workdir) in " ".join(p.info["cmdline"] or []) and _alive(p):
            seen.setdefault(p.pid, p)
    seen.pop(os.getpid(), None)
    stage = [p for p in seen.values() if SERVER_MARK not in cmdline(p)]
    server = [p for p in seen.values() if SERVER_MARK in cmdline(p)]
    return stage, server


def kill_all(procs: Iterable) -> None:
    for p in procs:
        with contextlib.suppress(_psutil().Error):
            p.kill()


def killpg(pid: int) -> None:
    """SIGKILL a process group, if it is still there."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
