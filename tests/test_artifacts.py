import json
import os
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import BaseModel

from settings.errors import UserError
from tasks.artifacts import MANIFEST, ArtifactStore, compute_key
from tasks.stage import Stage, execute, plan_key


class StageSettings(BaseModel):
    size: int = 1


def publish(store: ArtifactStore, key="k1", files=None, meta=None, inputs=None):
    with store.publish("stage", key, {"m": 1}, inputs or {}, "1") as build:
        for rel, data in (files or {"a.txt": b"hello", "sub/b.bin": b"\x00" * 100}).items():
            (build.out / rel).parent.mkdir(parents=True, exist_ok=True)
            (build.out / rel).write_bytes(data)
        build.meta.update(meta or {})
    return build.manifest


def test_publish_writes_manifest_last_with_sizes_and_hashes(tmp_path: Path):
    store = ArtifactStore(tmp_path)
    m = publish(store)
    final = store.path("stage", "k1")
    on_disk = json.loads((final / MANIFEST).read_text())
    assert {f["path"]: f["size"] for f in on_disk["files"]} == {"a.txt": 5, "sub/b.bin": 100}
    assert all(len(f["sha256"]) == 64 for f in on_disk["files"])
    assert store.check("stage", "k1", verify=True)[0].content_hash == m.content_hash
    assert not [p for p in (tmp_path / "artifacts" / "stage").iterdir() if p.name.startswith(".")]


def test_every_file_is_durable_before_the_manifest_names_it(tmp_path: Path, monkeypatch):
    """The order a crash cannot break: each file's data fsynced, the artifact folder renamed
    into place and its parent fsynced, then the manifest written, fsynced and renamed in."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):  # the real call, recorded with the path behind the descriptor
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", f"{src} -> {dst}"))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    publish(ArtifactStore(tmp_path))
    final = str(tmp_path / "artifacts" / "stage" / "k1")

    def first(kind, test):
        return next(i for i, (k, path) in enumerate(events) if k == kind and test(path))

    moved = first("rename", lambda p: p.endswith(f"-> {final}"))
    manifest = first("rename", lambda p: p.endswith(f"-> {final}/{MANIFEST}"))
    for name in ("a.txt", "sub/b.bin"):
        assert first("fsync", lambda p, n=name: p.endswith("/" + n)) < moved, name
    assert moved < first("fsync", lambda p: p == str(Path(final).parent)) < manifest
    assert first("fsync", lambda p: p.endswith(f".{MANIFEST}.tmp")) < manifest
    assert manifest < first("fsync", lambda p: p == final)


def test_failed_build_publishes_nothing_and_keeps_the_old_artifact(tmp_path: Path):
    store = ArtifactStore(tmp_path)
    old = publish(store)
    with pytest.raises(RuntimeError):
        with store.publish("stage", "k1", {}, {}, "1") as build:
            (build.out / "a.txt").write_text("half")
            raise RuntimeError("stage crashed")
    assert store.check("stage", "k1")[0].content_hash == old.content_hash
    assert sorted(p.name for p in (tmp_path / "artifacts" / "stage").iterdir()) == ["k1"]


def test_check_detects_missing_truncated_and_corrupt(tmp_path: Path):
    store = ArtifactStore(tmp_path)
    publish(store)
    final = store.path("stage", "k1")
    assert store.check("stage", "k2") == (None, "not built")
    data = (final / "sub/b.bin").read_bytes()
    (final / "sub/b.bin").write_bytes(data[:50])
    assert "has 50 bytes, manifest says 100" in store.check("stage", "k1")[1]
    (final / "sub/b.bin").write_bytes(b"\x01" * 100)  # same size, other bytes
    assert store.check("stage", "k1")[0] is not None  # sizes only by default
    assert "content hash differs" in store.check("stage", "k1", verify=True)[1]
    (final / "a.txt").unlink()
    assert store.check("stage", "k1")[1] == "missing file a.txt"
    (final / MANIFEST).unlink()
    assert "no manifest" in store.check("stage", "k1")[1]
    (final / MANIFEST).write_text("{not json")
    assert "unreadable manifest" in store.check("stage", "k1")[1]


def test_content_hash_tracks_content_not_time(tmp_path: Path):
    a = publish(ArtifactStore(tmp_path / "a"), meta={"x": 1})
    b = publish(ArtifactStore(tmp_path / "b"), meta={"x": 1})
    c = publish(ArtifactStore(tmp_path / "c"), files={"a.txt": b"other"}, meta={"x": 1})
    assert a.content_hash == b.content_hash != c.content_hash
    assert compute_key({"a": 1, "b": [1, 2]}) == compute_key({"b": [1, 2], "a": 1})


def test_records_and_dcp_save_metadata_stay_out_of_the_content_hash(tmp_path: Path):
    """Two saves of the same tensors with torch DCP (as Megatron's torch_dist checkpoints are
    written) differ in `.metadata` (temp path, save uuid) and in their logs and timings: the
    content hash is the same; other tensors give another hash, and every file is verified."""
    import torch
    import torch.distributed.checkpoint as dcp

    def build(root: Path, weight: torch.Tensor, log: str, seconds: float):
        store = ArtifactStore(root)
        with store.publish("stage", "k1", {}, {}, "1", records=("metrics.jsonl",)) as b:
            # saved under the temp dir, whose name is random, as every stage's output is
            dcp.save({"w": weight}, checkpoint_id=b.out / "release", no_dist=True)
            (b.out / "logs").mkdir()
            (b.out / "logs" / "convert.log").write_text(log)
            (b.out / "metrics.jsonl").write_text(json.dumps({"step": 1, "seconds": seconds}))
        return store, b.manifest

    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    store_a, a = build(tmp_path / "a", w, "12:00:01 pid 7", 1.5)
    _, b = build(tmp_path / "b", w.clone(), "12:07:42 pid 9", 1.7)
    _, c = build(tmp_path / "c", w.reshape(4, 3), "12:00:01 pid 7", 1.5)
    sha_a, sha_b = ({f.path: f.sha256 for f in m.files} for m in (a, b))
    assert sha_a["release/.metadata"] != sha_b["release/.metadata"]  # what the hash ignores
    assert sha_a["release/__0_0.distcp"] == sha_b["release/__0_0.distcp"]
    assert a.content_hash == b.content_hash != c.content_hash
    records = {f.path for f in a.files if f.record}
    assert records == {"logs/convert.log", "metrics.jsonl"}
    (store_a.path("stage", "k1") / "logs" / "convert.log").write_text("12:00:01 pid 8")
    assert "logs/convert.log content hash differs" in store_a.check("stage", "k1", verify=True)[1]


def test_stale_temp_dirs_of_dead_builders_are_swept(tmp_path: Path):
    store = ArtifactStore(tmp_path)
    stage_dir = tmp_path / "artifacts" / "stage"
    stage_dir.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = stage_dir / f".tmp-k1-{dead.pid}-{uuid.uuid4().hex[:8]}"
    live = stage_dir / f".tmp-k1-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for d in (stale, live):
        d.mkdir()
        (d / "partial").write_text("x")
    publish(store, key="k2")
    assert not stale.exists() and live.exists()


def test_symlinks_are_refused(tmp_path: Path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError, match="symlink"):
        with store.publish("stage", "k1", {}, {}, "1") as build:
            (build.out / "link").symlink_to("/etc/hostname")
    assert store.check("stage", "k1")[0] is None


def test_full_disk_gives_one_line_and_publishes_nothing(full_disk: Path):
    store = ArtifactStore(full_disk)
    with pytest.raises(UserError, match=r"disk full while publishing stage/k1 .* nothing was published"):
        publish(store, files={"big.bin": os.urandom(2 << 20)})
    assert store.check("stage", "k1")[0] is None
    assert list((full_disk / "artifacts" / "stage").iterdir()) == []


def test_concurrent_builders_of_one_artifact_build_it_once(tmp_path: Path):
    """Two runs reaching the same stage key at once: one builds, the other waits and reuses."""
    calls = []

    def slow_build(ctx):
        calls.append(1)
        time.sleep(1.0)
        (ctx.out / "x.txt").write_text("built")

    stage = Stage(name="slow", version="1", settings=lambda s: s, build=slow_build)
    section = StageSettings()
    plan = plan_key(stage, section, {})
    store = ArtifactStore(tmp_path)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: execute(stage, section, plan, {}, store), range(2)))
    assert len(calls) == 1
    assert sorted(built for _, built in results) == [False, True]
    assert results[0][0].content_hash == results[1][0].content_hash
