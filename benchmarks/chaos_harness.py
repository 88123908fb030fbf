"""The crash-drill harness behind benchmarks/chaos.py and tests/test_chaos.py: an uninterrupted
baseline run, then drills on copies of its workdir (kill -9 while a stage builds, a full disk, a
corrupted file), each followed by a rerun compared with the baseline."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.chaos_checks import (SERVER_MARK, cmdline, compare, descendants, kill_all, killpg,
                                     stage_children, survivors, verify_all)
from tasks import STAGE_NAMES
from tasks.artifacts import MANIFEST, ArtifactStore, Manifest

ROOT = Path(__file__).resolve().parents[1]


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


def start_prefect_server(env: dict[str, str], log: Path,
                         timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """`prefect server start` (no UI) on a free loopback port, in its own session; returns the
    process and its API URL once it answers."""
    import urllib.request

    from megatron_bridge.launch import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port)], env={**env, "PREFECT_UI_ENABLED": "0"}, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                killpg(server.pid)
                server.wait()
                raise RuntimeError(f"the Prefect server did not start; see {log}") from None
            time.sleep(0.5)


def clone_workdir(source: Path, work: Path) -> Path:
    """A copy of a built workdir the store reuses as is: artifacts hard-linked (never modified
    in place; break a link before editing a file), scratch copied (training appends to it)."""
    work.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source / "artifacts", work / "artifacts", copy_function=os.link,
                    ignore=shutil.ignore_patterns(".lock-*"))
    if (source / "scratch").is_dir():
        shutil.copytree(source / "scratch", work / "scratch")
    return work


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
        self.live: list[subprocess.Popen] = []
        self.server: subprocess.Popen | None = None

    def start_server(self) -> str:
        """One Prefect API server for every run (as under a worker) instead of the ephemeral
        server each `rsft run` starts for itself (~10 s each here); an API already given in the
        environment (`PREFECT_API_URL`) is used as it is."""
        if "PREFECT_API_URL" not in self.env:
            self.server, self.env["PREFECT_API_URL"] = start_prefect_server(
                self.env, self.root / "prefect-server.log")
        return self.env["PREFECT_API_URL"]

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
            killpg(proc.pid)
            proc.wait()
            rc = -999
        self.live.remove(proc)
        return rc, log.read_text(errors="replace")

    def cleanup(self) -> None:
        for proc in [*self.live, *([self.server] if self.server else [])]:
            killpg(proc.pid)
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
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return clone_workdir(base.workdir, folder / "work")

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
            rebuilt = (re.search(rf"building \S*/artifacts/{r.stage}/", log_text) is not None
                       and isinstance(m, Manifest)
                       and m.created_unix >= rebuilt_after)
            r.partial_reused = 0 if rebuilt else 1
        if left := list((work / "artifacts").glob("*/.tmp-*")):
            r.problems.append(f"temp dir(s) not swept by the rerun: {[p.name for p in left]}")

    def tidy(self, r: DrillResult, folder: Path, keep: bool) -> None:
        (folder / "result.json").write_text(json.dumps(vars(r) | {"passed": r.passed}, indent=2))
        if r.passed and not keep:
            for sub in ("artifacts", "scratch"):
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
            scratch = store.scratch("train", base.manifests["train"].meta["lineage"])
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
                    killpg(proc.pid)
                    proc.wait()
                    self.live.remove(proc)
                    self.tidy(r, folder, keep)
                    return r
                time.sleep(0.02)
            if wait_child:
                while not stage_children(proc.pid) and time.monotonic() < deadline:
                    if store.check(stage, key)[0] is not None or proc.poll() is not None:
                        break
                    time.sleep(0.02)
            delay = fraction * base.duration(stage)
            time.sleep(delay)
            r.delay = f"{delay:.1f}s ({fraction:.2f})"
            before = store.check(stage, key)[0] is not None  # published before the kill?
            snapshot = descendants(proc.pid)
            r.children_at_kill = len([p for p in snapshot if SERVER_MARK not in cmdline(p)])
            if target == "group":
                killpg(proc.pid)
                r.target = "flow group"
            else:
                ours = stage_children(proc.pid)
                if ours:
                    r.target = f"stage child ({_short(cmdline(ours[0]))})"
                    ours[0].kill()
                else:
                    os.kill(proc.pid, signal.SIGKILL)
                    r.target = "flow only (no child)"
            killed_at = time.time()
            try:
                rc = proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                r.problems.append("the flow hung after its stage process was killed")
                killpg(proc.pid)
                rc = proc.wait()
            self.live.remove(proc)
            if r.target.startswith("stage child"):
                notes.append(f"flow exit {rc}")
            time.sleep(1.0)  # PR_SET_PDEATHSIG delivery
            stage_left, servers = survivors(snapshot, work)
            r.orphans = [f"{p.pid} {_short(cmdline(p))}" for p in stage_left]
            r.servers_left = len(servers)
            kill_all(stage_left + servers)
            killpg(proc.pid)
        except BaseException:
            killpg(proc.pid)
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
            tracker = (store.scratch("train", base.manifests["train"].meta["lineage"])
                       / "checkpoints" / "latest_checkpointed_iteration.txt")
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
