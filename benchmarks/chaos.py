"""Crash drills: kill -9 `rsft run` (the whole flow process group, i.e. a dead worker, or only the
stage's child process) at a random point while a stage builds, rerun, and compare every final
artifact with an uninterrupted run. Plus a full disk during publish and corrupted artifact files.

    python benchmarks/chaos.py [--drills 24] [--seed 0] [--workdir DIR] [--stages convert train]

One uninterrupted baseline run of the preset, then each drill works on a copy of the baseline's
workdir (artifacts hard-linked, scratch copied; Prefect's cache records are keyed by workdir path,
so the copy starts with none) with the target stage's artifact deleted (for train also its
scratch, or on alternate drills the scratch rolled back to its first checkpoint, as a previous
crash leaves it). `rsft run` starts in its own session; once the stage's `.tmp-<key>-*` build dir
appears the drill sleeps a random fraction of the stage's baseline build time and sends SIGKILL.
Then it records what the kill left (temp dirs, a final dir without manifest, checkpoints) and
whether `ArtifactStore.check(verify=True)` would trust it, looks for surviving stage processes,
reruns `rsft run` to completion, re-hashes every artifact and compares each stage's manifest
with the baseline's. A kill that lands after the stage already published is reported as `late`
and is not counted as a kill in that stage (the drill is retried with a shorter delay).

"Identical" is `content_hash` equality: the content hash leaves out what records how a build
went (logs, timings) and the temp path and uuid torch DCP writes into a checkpoint's `.metadata`,
so every stage but evaluate rebuilds to the same hash. Evaluate's files hold absolute paths and
lighteval's timestamped results file: those are compared normalised (see VOLATILE), verdict
`equal*`; anything else that differs is `DIFF` and fails the drill. Each drill's logs stay under
`<workdir>/drills/<n>-<stage>/`; the copied artifacts of passed drills are removed (`--keep`).
Exits non-zero unless every drill passed.
"""

from __future__ import annotations

import os
import sys

# Import the checkout this script belongs to (the runs it starts use that checkout too), not
# whichever one is pip-installed: drills are run from snapshots of the tree.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import contextlib
import json
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from functools import partial
from pathlib import Path

from tasks import STAGE_NAMES
from tasks.artifacts import MANIFEST, ArtifactStore, Manifest

ROOT = Path(__file__).resolve().parents[1]

ISSUE_STAGES = ["download", "patch_tokenizer", "convert", "tokenize", "train", "export", "evaluate"]
"""The stages the issue asks to kill (dataset builds in about a second; add it with --stages)."""
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
        sys.exit("benchmarks/chaos.py needs psutil (pip install psutil)")
    return psutil


def _cmdline(p) -> str:
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


def stage_processes(pid: int) -> list:
    """The flow's descendants that are stage work (everything but Prefect's API server)."""
    return [p for p in descendants(pid) if SERVER_MARK not in _cmdline(p)]


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
    stage = [p for p in seen.values() if SERVER_MARK not in _cmdline(p)]
    server = [p for p in seen.values() if SERVER_MARK in _cmdline(p)]
    return stage, server


def _kill(procs: Iterable) -> None:
    for p in procs:
        with contextlib.suppress(_psutil().Error):
            p.kill()


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# -- the harness -----------------------------------------------------------------------------------
@dataclass
class Baseline:
    workdir: Path
    manifests: dict[str, Manifest]
    seconds: float

    @property
    def keys(self) -> dict[str, str]:
        return {s: m.key for s, m in self.manifests.items()}

    def duration(self, stage: str) -> float:
        return max(self.manifests[stage].build_seconds, 0.05)


@dataclass
class DrillResult:
    n: int
    stage: str
    kind: str = "kill"
    target: str = "-"
    """What was killed: `flow group`, `stage child (…)`, `flow only (no child)`, or the fault."""
    delay: str = "-"
    left: str = "-"
    """What the kill left on disk for the stage."""
    mid_stage: bool = False
    """The kill came while the stage was building (counted as a kill in that stage)."""
    children_at_kill: int = 0
    """Stage processes (the flow's children other than Prefect's server) running at the kill."""
    trusted_partial: bool = False
    orphans: list[str] = field(default_factory=list)
    servers_left: int = 0
    """Prefect API servers left running by a kill of the flow process alone (cleaned up)."""
    rerun_ok: bool = False
    identical: str = "-"
    volatile: list[str] = field(default_factory=list)
    partial_reused: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return (self.rerun_ok and self.identical in ("hash", "equal*") and not self.problems
                and not self.trusted_partial and not self.orphans and not self.partial_reused)


class Harness:
    """Runs `rsft run` as a user does, in a workdir under `root`, with `sets` applied to every
    run (the tests pass cheaper settings)."""

    def __init__(self, root: Path, sets: Iterable[str] = (), preset: str = "tiny",
                 env: dict[str, str] | None = None, timeout: float = 3600,
                 say: Callable[[str], None] = print):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.sets = list(sets)
        self.preset = preset
        self.timeout = timeout
        self.say = say
        self.env = dict(env or os.environ)
        self.env.setdefault("PREFECT_HOME", str(self.root / "prefect-home"))
        self.env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                        PYTHONUNBUFFERED="1", COLUMNS="200")
        self.env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        self.env.pop("PREFECT_API_URL", None)
        self.live: list[subprocess.Popen] = []
        self.server: subprocess.Popen | None = None

    def start_server(self, timeout: float = 300) -> str:
        """One Prefect API server for every run (as under a worker) instead of the ephemeral
        server each `rsft run` starts for itself (~10 s each here)."""
        import urllib.request

        from megatron_bridge.launch import free_port

        url = f"http://127.0.0.1:{free_port()}/api"
        port = url.rsplit(":", 1)[1].split("/")[0]
        with open(self.root / "prefect-server.log", "w") as out:
            self.server = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                 "--port", port], env={**self.env, "PREFECT_UI_ENABLED": "0"}, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if self.server.poll() is not None or time.monotonic() > deadline:
                    self.cleanup()
                    raise RuntimeError("the Prefect server did not start; see "
                                       f"{self.root / 'prefect-server.log'}") from None
                time.sleep(0.5)
        self.env["PREFECT_API_URL"] = url
        return url

    # running rsft ------------------------------------------------------------------------------
    def command(self, workdir: Path, *args: str) -> list[str]:
        sets = [a for s in self.sets for a in ("--set", s)]
        return [sys.executable, "-m", "flows.cli", "run", self.preset, "--set",
                f"workdir={workdir}", *sets, *args]

    def start(self, workdir: Path, log: Path, *args: str, prefix: list[str] | None = None
              ) -> subprocess.Popen:
        with open(log, "w") as out:
            proc = subprocess.Popen([*(prefix or []), *self.command(workdir, *args)], cwd=ROOT,
                                    env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.live.append(proc)
        return proc

    def run(self, workdir: Path, log: Path, *args: str, prefix: list[str] | None = None
            ) -> tuple[int, str]:
        proc = self.start(workdir, log, *args, prefix=prefix)
        try:
            rc = proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            proc.wait()
            rc = -999
        self.live.remove(proc)
        return rc, log.read_text(errors="replace")

    def cleanup(self) -> None:
        for proc in [*self.live, *([self.server] if self.server else [])]:
            _killpg(proc.pid)
            proc.wait()
        self.live, self.server = [], None

    # baseline ----------------------------------------------------------------------------------
    def baseline(self, reuse: bool = False) -> Baseline:
        work = self.root / "baseline" / "work"
        record = self.root / "baseline" / "baseline.json"
        if reuse and record.is_file():
            data = json.loads(record.read_text())
            found = verify_all(work, data["keys"])
            if all(isinstance(m, Manifest) for m in found.values()):
                self.say(f"baseline: reusing {work}")
                return Baseline(work, found, data["seconds"])  # type: ignore[arg-type]
        shutil.rmtree(work.parent, ignore_errors=True)
        work.parent.mkdir(parents=True)
        self.say(f"baseline: uninterrupted `rsft run` in {work} ...")
        start = time.monotonic()
        rc, out = self.run(work, work.parent / "run.log")
        seconds = time.monotonic() - start
        if rc != 0:
            raise RuntimeError(f"the baseline run failed ({rc}):\n{out[-3000:]}")
        store = ArtifactStore(work)
        manifests = {}
        for stage in STAGE_NAMES:
            found = sorted((work / "artifacts" / stage).glob(f"*/{MANIFEST}"))
            if len(found) != 1:
                raise RuntimeError(f"baseline: expected one {stage} artifact, found {len(found)}")
            manifest, why = store.check(stage, found[0].parent.name, verify=True)
            if manifest is None:
                raise RuntimeError(f"baseline: {stage} artifact is {why}")
            manifests[stage] = manifest
        record.write_text(json.dumps({"keys": {s: m.key for s, m in manifests.items()},
                                      "seconds": seconds}))
        self.say(f"baseline: {seconds:.0f} s; " + ", ".join(
            f"{s} {m.build_seconds:.1f}s" for s, m in manifests.items()))
        return Baseline(work, manifests, seconds)

    def clone(self, base: Baseline, folder: Path) -> Path:
        """A copy of the baseline workdir: artifacts hard-linked (never modified in place; break
        a link before editing a file), scratch copied (training appends to it)."""
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        work = folder / "work"
        work.mkdir()
        shutil.copytree(base.workdir / "artifacts", work / "artifacts", copy_function=os.link,
                        ignore=shutil.ignore_patterns(".lock-*"))
        if (base.workdir / "scratch").is_dir():
            shutil.copytree(base.workdir / "scratch", work / "scratch")
        return work

    # checks after a rerun ------------------------------------------------------------------------
    def finish(self, r: DrillResult, base: Baseline, work: Path, rebuilt_after: float | None,
               log_text: str, rc: int) -> None:
        """Rerun outcome, re-hash everything, compare with the baseline, partial reuse."""
        r.rerun_ok = rc == 0
        if rc != 0:
            r.problems.append(f"rerun exit {rc}")
            return
        found = verify_all(work, base.keys)
        verdicts, volatile = [], []
        for stage, m in found.items():
            if not isinstance(m, Manifest):
                r.problems.append(f"{stage} after rerun: {m}")
                verdicts.append("DIFF")
                continue
            verdict, notes = compare(stage, base.manifests[stage], m, base.workdir, work)
            verdicts.append(verdict)
            if verdict == "DIFF":
                r.problems.append(f"{stage} differs: {'; '.join(notes)}")
            volatile += [f"{stage}/{n}" for n in notes if verdict != "DIFF"]
        r.identical = ("DIFF" if "DIFF" in verdicts else
                       "equal*" if "equal*" in verdicts else "hash")
        r.volatile = volatile
        if rebuilt_after is not None:  # the stage was left partial: the rerun must rebuild it
            m = found[r.stage]
            rebuilt = (f"{r.stage}: building" in log_text and isinstance(m, Manifest)
                       and m.created_unix >= rebuilt_after)
            r.partial_reused = 0 if rebuilt else 1
        if left := list((work / "artifacts").glob("*/.tmp-*")):
            r.problems.append(f"temp dir(s) not swept by the rerun: {[p.name for p in left]}")

    def tidy(self, r: DrillResult, folder: Path, keep: bool) -> None:
        (folder / "result.json").write_text(json.dumps(vars(r) | {"passed": r.passed}, indent=2))
        if r.passed and not keep:
            for sub in ("artifacts", "scratch", "prefect"):
                shutil.rmtree(folder / "work" / sub, ignore_errors=True)

    # the kill drill ----------------------------------------------------------------------------
    def kill_drill(self, base: Baseline, n: int, stage: str, target: str, fraction: float,
                   train_scratch: str = "fresh", wait_child: bool = False, until: str | None = None,
                   keep: bool = False) -> DrillResult:
        """Kill `rsft run` while `stage` builds: `target` is `group` (the flow's process group:
        a dead worker) or `child` (only the stage's child process; the flow process alone when
        the stage has none at that moment). The delay is `fraction` of the stage's baseline
        build time after its temp dir appears (after its child process appears with
        `wait_child`). `train_scratch`: `fresh` (deleted) or `resume` (rolled back to its first
        checkpoint). `until` limits both runs (the tests stop early)."""
        started = time.monotonic()
        folder = self.root / "drills" / f"{n:02d}-{stage}"
        work = self.clone(base, folder)
        key = base.keys[stage]
        store = ArtifactStore(work)
        r = DrillResult(n, stage)
        shutil.rmtree(store.path(stage, key))
        notes = []
        if stage == "train":
            scratch = store.scratch("train", key)
            if train_scratch == "resume" and (it := _roll_back(scratch)) is not None:
                notes.append(f"scratch@{it}")
            else:
                shutil.rmtree(scratch, ignore_errors=True)
                notes.append("no scratch")
        args = ["--until", until] if until else []
        proc = self.start(work, folder / "killed.log", *args)
        stage_dir = work / "artifacts" / stage
        deadline = time.monotonic() + self.timeout
        try:
            while not list(stage_dir.glob(f".tmp-{key}-*")):
                if proc.poll() is not None or time.monotonic() > deadline:
                    r.problems.append(f"rsft ended ({proc.poll()}) before {stage} started building")
                    _killpg(proc.pid)
                    proc.wait()
                    self.live.remove(proc)
                    self.tidy(r, folder, keep)
                    return r
                time.sleep(0.02)
            if wait_child:
                while not stage_processes(proc.pid) and time.monotonic() < deadline:
                    if store.check(stage, key)[0] is not None or proc.poll() is not None:
                        break
                    time.sleep(0.02)
            delay = fraction * base.duration(stage)
            time.sleep(delay)
            r.delay = f"{delay:.1f}s ({fraction:.2f})"
            before = store.check(stage, key)[0] is not None  # published before the kill?
            snapshot = descendants(proc.pid)
            r.children_at_kill = len([p for p in snapshot if SERVER_MARK not in _cmdline(p)])
            if target == "group":
                _killpg(proc.pid)
                r.target = "flow group"
            else:
                ours = [p for p in stage_processes(proc.pid) if p.ppid() == proc.pid]
                if ours:
                    r.target = f"stage child ({_short(_cmdline(ours[0]))})"
                    ours[0].kill()
                else:
                    os.kill(proc.pid, signal.SIGKILL)
                    r.target = "flow only (no child)"
            killed_at = time.time()
            try:
                rc = proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                r.problems.append("the flow hung after its stage process was killed")
                _killpg(proc.pid)
                rc = proc.wait()
            self.live.remove(proc)
            if r.target.startswith("stage child"):
                notes.append(f"flow exit {rc}")
            time.sleep(1.0)  # PR_SET_PDEATHSIG delivery
            stage_left, servers = survivors(snapshot, work)
            r.orphans = [f"{p.pid} {_short(_cmdline(p))}" for p in stage_left]
            r.servers_left = len(servers)
            _kill(stage_left + servers)
            _killpg(proc.pid)
        except BaseException:
            _killpg(proc.pid)
            raise
        # What the kill left, and whether a check would trust it.
        manifest, _ = store.check(stage, key, verify=True)
        temps = list(stage_dir.glob(".tmp-*"))
        final = store.path(stage, key)
        if manifest is not None:  # it had published: the kill came after the stage
            r.left = "published (late)" if before else "published during the kill"
            if not before and r.target.startswith("stage child"):
                r.problems.append("published although its stage process was killed")
        else:
            parts = [f"{len(temps)} tmp dir" if temps else "",
                     "final dir w/o manifest" if final.exists() else ""]
            r.left = ", ".join(p for p in parts if p) or "nothing"
        r.mid_stage = manifest is None
        if stage == "train":
            tracker = store.scratch("train", key) / "checkpoints" / "latest_checkpointed_iteration.txt"
            notes.append(f"ckpt@{tracker.read_text().strip()}" if tracker.is_file() else "no ckpt")
        r.left = "; ".join([r.left, *notes])
        rc, out = self.run(work, folder / "rerun.log", *args)
        if stage == "train" and "resuming in" in out:
            r.left += " → resumed"
        self.finish(r, base, work, None if manifest is not None else killed_at, out, rc)
        r.seconds = time.monotonic() - started
        self.tidy(r, folder, keep)
        return r

    # full disk ---------------------------------------------------------------------------------
    def disk_drill(self, base: Baseline, n: int, stage: str = "patch_tokenizer",
                   size: str = "1m", keep: bool = False) -> DrillResult:
        """`rsft run` with the stage's artifact folder on a `size` tmpfs (in a private mount
        namespace, as tests/conftest.py's full_disk does with a plain mount): one-line error,
        exit 2, nothing published; the rerun with space builds it."""
        started = time.monotonic()
        folder = self.root / "drills" / f"{n:02d}-{stage}-disk"
        work = self.clone(base, folder)
        key = base.keys[stage]
        store = ArtifactStore(work)
        r = DrillResult(n, stage, kind="full disk", target=f"{size}B tmpfs as its artifact folder")
        shutil.rmtree(store.path(stage, key))
        mount = work / "artifacts" / stage
        listing = folder / "disk-listing.txt"
        script = ('size="$1"; mnt="$2"; listing="$3"; shift 3; '
                  'mount -t tmpfs -o size="$size" tmpfs "$mnt" || exit 97; '
                  '"$@"; rc=$?; ls -A "$mnt" > "$listing"; exit $rc')
        unshare = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
        prefix = [*unshare, "sh", "-c", script, "sh", size, str(mount), str(listing)]
        rc, out = self.run(work, folder / "full-disk.log", prefix=prefix)
        if rc == 97 or (rc != 0 and "unshare:" in out):
            r.left = "skipped: cannot mount a tmpfs here (needs root or user namespaces)"
            r.problems.append("skipped")
            self.tidy(r, folder, keep)
            return r
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        r.left = f"exit {rc}: " + (errors[0][:70] if errors else "no error line")
        if rc != 2 or len(errors) != 1 or "disk" not in errors[0] or "Traceback" in out:
            r.problems.append(f"expected exit 2 with one `error: … disk …` line, got exit {rc}, "
                              f"{len(errors)} error line(s)")
        inside = listing.read_text().split() if listing.is_file() else ["?"]
        if [x for x in inside if not x.startswith(".lock-")]:
            r.problems.append(f"left on the full disk: {inside}")
        r.mid_stage = True
        started_rerun = time.time()
        rc, out = self.run(work, folder / "rerun.log")
        self.finish(r, base, work, started_rerun, out, rc)
        r.seconds = time.monotonic() - started
        self.tidy(r, folder, keep)
        return r

    # corrupted files ---------------------------------------------------------------------------
    def corrupt_drill(self, base: Baseline, n: int, mode: str, stage: str | None = None,
                      file: str | None = None, until: str | None = None,
                      keep: bool = False) -> DrillResult:
        """`flip`: same-size byte flips in a published file; sizes still match, `rsft run
        --verify` must rebuild it. `truncate`: half the file; a plain `rsft run` must rebuild
        it. Either way the result must equal the baseline."""
        started = time.monotonic()
        stage = stage or ("download" if mode == "flip" else "tokenize")
        file = file or ("model.safetensors" if mode == "flip" else "train-tokens.bin")
        folder = self.root / "drills" / f"{n:02d}-{stage}-{mode}"
        work = self.clone(base, folder)
        key = base.keys[stage]
        store = ArtifactStore(work)
        r = DrillResult(n, stage, kind=f"corrupt ({mode})", target=f"{file}")
        path = store.path(stage, key) / file
        data = bytearray(path.read_bytes())
        path.unlink()  # break the hard link to the baseline's file
        if mode == "flip":
            middle = len(data) // 2
            data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
        else:
            del data[len(data) // 2:]
        path.write_bytes(bytes(data))
        plain, _ = store.check(stage, key)
        hashed, _ = store.check(stage, key, verify=True)
        r.left = (f"size check: {'passes' if plain else 'fails'}; hash check: "
                  f"{'passes' if hashed else 'fails'}")
        if hashed is not None or (mode == "truncate" and plain is not None):
            r.trusted_partial = True
        r.mid_stage = True
        args = (["--verify"] if mode == "flip" else []) + (["--until", until] if until else [])
        started_rerun = time.time()
        rc, out = self.run(work, folder / "rerun.log", *args)
        self.finish(r, base, work, started_rerun, out, rc)
        r.seconds = time.monotonic() - started
        self.tidy(r, folder, keep)
        return r


def _roll_back(scratch: Path) -> int | None:
    """Leave only the first kept checkpoint in a training scratch folder, as a crash after it
    would (the trainer drops metrics after the checkpoint it resumes from)."""
    ckpts = scratch / "checkpoints"
    iters = sorted(ckpts.glob("iter_*"))
    if len(iters) < 2:
        return None
    for d in iters[1:]:
        shutil.rmtree(d)
    it = int(iters[0].name.split("_")[1])
    (ckpts / "latest_checkpointed_iteration.txt").write_text(str(it))
    return it


def _short(cmd: str) -> str:
    m = re.search(r"-m (\S+)(?: (\S+))?", cmd)
    if not m:
        return cmd[:40]
    return f"{m.group(1)} {m.group(2)}" if m.group(1) == "megatron_bridge" else m.group(1)


# -- the benchmark ---------------------------------------------------------------------------------
def plan(stages: list[str], drills: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """(stage, kill target, train scratch mode) per drill: stages cycle in a fresh random order;
    each stage alternates group/child kills (and train fresh/resume scratch) from a random
    start."""
    out = []
    first_target = {s: rng.random() < 0.5 for s in stages}
    count = {s: 0 for s in stages}
    order: list[str] = []
    for _ in range(drills):
        if not order:
            order = rng.sample(stages, len(stages))
        s = order.pop(0)
        flip = (count[s] % 2 == 0) == first_target[s]
        out.append((s, "group" if flip else "child", "fresh" if count[s] % 2 == 0 else "resume"))
        count[s] += 1
    return out


def print_table(results: list[DrillResult], say: Callable[[str], None] = print) -> None:
    cols = [("#", 3), ("stage", 15), ("drill", 18), ("kill target / fault", 36), ("delay", 13),
            ("left after kill", 44), ("orphans", 7), ("rerun", 5), ("identical", 9),
            ("partial reused", 14), ("result", 6)]
    say("  ".join(f"{c:<{w}}" for c, w in cols))
    for r in results:
        result = "pass" if r.passed else ("skip" if r.problems == ["skipped"] else "FAIL")
        kind = r.kind if r.kind != "kill" else ("kill" if r.mid_stage else "kill (late)")
        row = [str(r.n), r.stage, kind, r.target, r.delay, r.left, str(len(r.orphans)),
               "ok" if r.rerun_ok else "no", r.identical, str(r.partial_reused), result]
        say("  ".join(f"{v[:w]:<{w}}" for v, (_, w) in zip(row, cols)))
        for p in r.problems:
            if p != "skipped":
                say(f"      problem: {p}")
        for o in r.orphans:
            say(f"      orphan: {o}")


def _guarded(n: int, stage: str, drill: Callable[[], DrillResult]) -> DrillResult:
    """A drill whose harness broke is a failed drill, not the end of the benchmark."""
    try:
        return drill()
    except Exception as e:  # noqa: BLE001
        import traceback

        r = DrillResult(n, stage, kind="harness error")
        r.problems.append(f"{type(e).__name__}: {e}")
        traceback.print_exc()
        return r


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drills", type=int, default=24, help="kill drills (default 24)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the baseline, drills and logs go (default: a new temp dir)")
    parser.add_argument("--stages", nargs="+", choices=STAGE_NAMES, default=ISSUE_STAGES,
                        metavar="STAGE", help=f"stages to kill (default: {' '.join(ISSUE_STAGES)})")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="extra settings for every run (repeatable)")
    parser.add_argument("--no-faults", action="store_true",
                        help="skip the full-disk and corrupted-file drills")
    parser.add_argument("--reuse-baseline", action="store_true",
                        help="reuse <workdir>/baseline if it is complete and intact")
    parser.add_argument("--keep", action="store_true", help="keep passed drills' artifacts")
    parser.add_argument("--server", action="store_true",
                        help="run every `rsft run` against one Prefect server started here "
                        "(as under a worker; saves the ~10 s ephemeral server start per run)")
    parser.add_argument("--max-late-retries", type=int, default=2,
                        help="retry a drill whose kill came after the stage published")
    args = parser.parse_args()

    root = args.workdir or Path(tempfile.mkdtemp(prefix="rsft-chaos-"))
    rng = random.Random(args.seed)

    def say(line: str) -> None:
        print(line, flush=True)

    harness = Harness(root, args.sets, args.preset, say=say)
    say(f"chaos drills in {harness.root} (seed {args.seed})")
    started = time.monotonic()
    results: list[DrillResult] = []
    try:
        if args.server:
            say(f"prefect server: {harness.start_server()}")
        base = harness.baseline(reuse=args.reuse_baseline)
        n = 0
        for stage, target, scratch in plan(args.stages, args.drills, rng):
            fraction = rng.uniform(0.05, 0.95)
            for attempt in range(args.max_late_retries + 1):
                n += 1
                r = _guarded(n, stage, partial(harness.kill_drill, base, n, stage, target,
                                               fraction, scratch, keep=args.keep))
                results.append(r)
                say(f"drill {n}: {stage} {r.target} after {r.delay}: left {r.left}; rerun "
                    f"{'ok' if r.rerun_ok else 'FAILED'}, {r.identical}, "
                    f"{'pass' if r.passed else 'FAIL ' + '; '.join(r.problems + r.orphans)} "
                    f"({r.seconds:.0f} s)")
                if r.mid_stage:
                    break
                fraction /= 3  # the stage finished first: try earlier
        if not args.no_faults:
            for fault in (lambda k: harness.disk_drill(base, k, keep=args.keep),
                          lambda k: harness.corrupt_drill(base, k, "flip", keep=args.keep),
                          lambda k: harness.corrupt_drill(base, k, "truncate", keep=args.keep)):
                n += 1
                r = _guarded(n, "-", partial(fault, n))
                results.append(r)
                say(f"drill {n}: {r.kind} {r.stage}: {r.left}; "
                    f"{'pass' if r.passed else 'FAIL ' + '; '.join(r.problems)} ({r.seconds:.0f} s)")
    finally:
        harness.cleanup()
    say("")
    print_table(results, say)
    kills = [r for r in results if r.kind == "kill"]
    counted = [r for r in kills if r.mid_stage]
    per_stage = {s: sum(r.stage == s for r in counted) for s in args.stages}
    volatile = sorted({v.split(" (")[1].rstrip(")") for r in results for v in r.volatile})
    say("")
    say(f"mid-stage kills: {len(counted)} (" + ", ".join(f"{s} {c}" for s, c in per_stage.items())
        + f"); late kills (stage already published, not counted): {len(kills) - len(counted)}")
    groups = [r for r in counted if r.target == "flow group"]
    say(f"kill targets: flow group {len(groups)} ({sum(r.children_at_kill > 0 for r in groups)} "
        f"with a stage process running, which must die with the flow), stage child "
        f"{sum(r.target.startswith('stage child') for r in counted)}, flow only (no child) "
        f"{sum(r.target.startswith('flow only') for r in counted)}")
    say(f"reruns complete: {sum(r.rerun_ok for r in counted)}/{len(counted)}; identical to the "
        f"baseline: {sum(r.identical in ('hash', 'equal*') for r in counted)}/{len(counted)} "
        f"(by content_hash: {sum(r.identical == 'hash' for r in counted)}); partial artifacts "
        f"trusted: {sum(r.trusted_partial for r in results)}, reused: "
        f"{sum(r.partial_reused for r in results)}; orphaned stage processes: "
        f"{sum(len(r.orphans) for r in results)}; Prefect servers left by flow-only kills: "
        f"{sum(r.servers_left for r in results)}")
    for rule in volatile:
        say(f"  equal* allowed: {rule}: {RULE_WHY[rule]}")
    skipped = [r for r in results if r.problems == ["skipped"]]
    ran = [r for r in results if r not in skipped]
    passed = sum(r.passed for r in ran)
    say(f"drills passed: {passed}/{len(ran)}" + (f" ({len(skipped)} skipped)" if skipped else "")
        + f"; {time.monotonic() - started:.0f} s; logs under {harness.root / 'drills'}")
    return 0 if passed == len(ran) and not skipped else 1


if __name__ == "__main__":
    sys.exit(main())
