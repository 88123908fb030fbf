"""The content-addressed artifact store.

Every stage output lives at `<workdir>/artifacts/<stage>/<key>/`, where the key hashes the stage's
name, version, key-relevant settings and its upstream artifacts' keys. An artifact is visible only
when complete:

    build into `<stage>/.tmp-<key>-<pid>-<rand>/` → fsync every file → rename to `<key>/`
    → write `manifest.json` last (relative paths, sizes, sha256, lineage), atomically.

A directory without a valid manifest, or whose files do not match it, is never trusted: `check`
reports why and the caller rebuilds it. Sizes are always checked; content hashes with `verify`.

The content hash (what downstream stages are keyed on) covers what the artifact *is*, not how a
particular build went: record files (logs, timings) are kept and verified but left out, and a
torch DCP `.metadata` counts without the save's temp path and uuid. So a deterministic stage
rebuilt for any reason (forced, deleted, corrupted) keeps its downstream stages cached.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import pickle
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from megatron_bridge.files import fsync_path
from settings.errors import UserError

MANIFEST = "manifest.json"
KEY_LENGTH = 16
_CHUNK = 1 << 20
PROGRESS_MIN_BYTES = 256 << 20
RECORDS = ("*.log",)
"""Files every stage keeps as a record of its build, outside the content hash."""


class FileEntry(BaseModel):
    path: str
    size: int
    sha256: str
    content_sha256: str | None = None
    """The hash that counts for the content hash when it is not `sha256` (DCP `.metadata`)."""
    record: bool = False
    """A record of the build (log, timings): verified, but not part of the content hash."""


class Manifest(BaseModel):
    """What a stage published: passed between tasks instead of the data itself."""

    stage: str
    key: str
    version: str
    path: str
    """Absolute path of the artifact directory."""
    key_material: dict[str, Any]
    """Everything the key was computed from (settings, fingerprints, upstream keys)."""
    inputs: dict[str, str] = Field(default_factory=dict)
    """Upstream stage → content hash of the artifact this one was built from (lineage)."""
    meta: dict[str, Any] = Field(default_factory=dict)
    """Stage-specific facts about the output (deterministic: no timestamps)."""
    files: list[FileEntry]
    content_hash: str
    """Hash over `meta` and every non-record file's path and content sha256: equal content ⇔
    equal hash."""
    created_unix: float = 0.0
    build_seconds: float = 0.0

    @property
    def dir(self) -> Path:
        return Path(self.path)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def compute_key(key_material: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(key_material)).hexdigest()[:KEY_LENGTH]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def content_hash(files: list[FileEntry], meta: dict[str, Any]) -> str:
    material = {"files": sorted((f.path, f.content_sha256 or f.sha256) for f in files
                                if not f.record), "meta": meta}
    return hashlib.sha256(_canonical(material)).hexdigest()


def dcp_metadata_sha256(path: Path) -> str | None:
    """sha256 of a torch DCP `.metadata` without its `storage_meta` (the path it was saved to and
    a random save id), entries in sorted order; None if the file is not one."""
    import torch.distributed.checkpoint  # noqa: F401  (the classes the pickle refers to)

    try:
        with open(path, "rb") as f:
            meta = pickle.load(f)  # a file this stage has just written
        fields = {k: v for k, v in vars(meta).items() if k != "storage_meta"}
    except Exception:  # noqa: BLE001  (not a DCP metadata pickle: hashed as bytes)
        return None
    canonical = {k: sorted((repr(a), repr(b)) for a, b in v.items()) if isinstance(v, dict)
                 else repr(v) for k, v in sorted(fields.items())}
    return hashlib.sha256(_canonical(canonical)).hexdigest()


def progress(total_bytes: int, desc: str) -> tqdm:
    """A byte progress bar, shown only for work big enough to wait for."""
    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True,
                disable=total_bytes < PROGRESS_MIN_BYTES, leave=False)


def ensure_free_space(path: Path, needed: int, what: str) -> None:
    """Fail before writing `needed` bytes under `path` if the disk cannot hold them."""
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < needed * 1.02 + (64 << 20):
        raise UserError(f"not enough disk space for {what}: needs {needed / 1e9:.2f} GB, "
                        f"{free / 1e9:.2f} GB free under {path}; free space or move workdir")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ArtifactStore:
    """`<workdir>/artifacts`: publish, check and locate stage artifacts."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir).resolve()
        self.root = self.workdir / "artifacts"

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def scratch(self, stage: str, key: str) -> Path:
        """`<workdir>/scratch/<stage>/<key>`: a stage's resumable work in progress (training
        checkpoints), kept across failed attempts and never read as an artifact."""
        return self.workdir / "scratch" / stage / key

    def lock(self, stage: str, key: str) -> FileLock:
        """Serialises builders of one artifact across processes. An OS lock (flock): a killed
        holder releases it, so a crash never blocks the rerun."""
        (self.root / stage).mkdir(parents=True, exist_ok=True)
        return FileLock(self.root / stage / f".lock-{key}")

    # -- reading ---------------------------------------------------------------------------
    def check(self, stage: str, key: str, verify: bool = False) -> tuple[Manifest | None, str]:
        """The artifact's manifest if it is complete and intact, else (None, why not)."""
        final = self.path(stage, key)
        if not final.is_dir():
            return None, "not built"
        try:
            manifest = Manifest.model_validate_json((final / MANIFEST).read_text())
        except FileNotFoundError:
            return None, "incomplete (no manifest): an interrupted publish"
        except (OSError, ValueError) as e:
            return None, f"unreadable manifest ({type(e).__name__})"
        if manifest.stage != stage or manifest.key != key:
            return None, "manifest belongs to another artifact"
        for entry in manifest.files:
            file = final / entry.path
            try:
                size = file.stat().st_size
            except FileNotFoundError:
                return None, f"missing file {entry.path}"
            if size != entry.size:
                return None, f"{entry.path} has {size} bytes, manifest says {entry.size}"
            if verify and sha256_file(file) != entry.sha256:
                return None, f"{entry.path} content hash differs from the manifest"
        manifest.path = str(final)  # the workdir may have moved since it was written
        return manifest, "ok"

    # -- writing ---------------------------------------------------------------------------
    @contextmanager
    def publish(self, stage: str, key: str, key_material: dict[str, Any],
                inputs: dict[str, str], version: str,
                records: tuple[str, ...] = ()) -> Iterator[_Build]:
        """Build into a private temp dir; on normal exit make it the artifact, atomically.

        On any exception the temp dir is removed and nothing at `<stage>/<key>` changes.
        `records`: globs (on the relative path) of files kept out of the content hash, besides
        `RECORDS`.
        """
        stage_dir = self.root / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        self._sweep_stale(stage_dir)
        tmp = stage_dir / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        build = _Build(tmp)
        started = time.time()
        try:
            yield build
            files = self._seal(tmp, (*RECORDS, *records))
            final = self.path(stage, key)
            manifest = Manifest(
                stage=stage, key=key, version=version, path=str(final), key_material=key_material,
                inputs=inputs, meta=build.meta, files=files,
                content_hash=content_hash(files, build.meta), created_unix=time.time(),
                build_seconds=round(time.time() - started, 3),
            )
            self._replace(tmp, final)
            self._write_manifest(final, manifest)
            build.manifest = manifest
        except Exception as e:
            # Writers other than Python's own (safetensors, torch) report ENOSPC in their text.
            if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
                raise UserError(
                    f"disk full while publishing {stage}/{key} under {self.root}: free space "
                    "there (or set workdir to a larger disk) and rerun; nothing was published"
                ) from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _seal(tmp: Path, records: tuple[str, ...]) -> list[FileEntry]:
        """Hash and fsync every file; refuse links that point outside the artifact."""
        entries = []
        files = sorted(p for p in tmp.rglob("*") if not p.is_dir())
        if links := [f.relative_to(tmp).as_posix() for f in files if f.is_symlink()]:
            raise RuntimeError(f"artifact file {links[0]} is a symlink; stages must write real files")
        with progress(sum(f.stat().st_size for f in files), "hashing artifact") as bar:
            for file in files:
                fsync_path(file)
                size = file.stat().st_size
                rel = file.relative_to(tmp).as_posix()
                entries.append(FileEntry(
                    path=rel, size=size, sha256=sha256_file(file),
                    content_sha256=dcp_metadata_sha256(file) if file.name == ".metadata" else None,
                    record=any(fnmatch.fnmatch(rel, g) for g in records)))
                bar.update(size)
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            fsync_path(d)
        return entries

    @staticmethod
    def _replace(tmp: Path, final: Path) -> None:
        """Move the sealed temp dir into place; an old (invalid or forced) artifact is removed."""
        if final.exists():
            trash = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, final)
        fsync_path(final.parent)

    @staticmethod
    def _write_manifest(final: Path, manifest: Manifest) -> None:
        tmp = final / f".{MANIFEST}.tmp"
        with open(tmp, "w") as f:
            f.write(manifest.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final / MANIFEST)
        fsync_path(final)

    @staticmethod
    def unpublish(final: Path) -> None:
        """Withdraw a published artifact: its manifest goes first (so nothing trusts the rest),
        then the folder is moved aside and removed."""
        (final / MANIFEST).unlink(missing_ok=True)
        fsync_path(final)
        trash = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def _sweep_stale(stage_dir: Path) -> None:
        """Remove temp/trash dirs left by killed processes (never those of a live builder)."""
        for d in stage_dir.glob(".*-*"):
            if d.name.startswith(".lock-"):
                continue
            if d.name.startswith(".tmp-"):
                try:
                    pid = int(d.name.split("-")[2])
                except (IndexError, ValueError):
                    pid = -1
                if pid > 0 and _pid_alive(pid):
                    continue
            shutil.rmtree(d, ignore_errors=True)


class _Build:
    """Handle given to a stage while it builds: where to write, and facts to record."""

    def __init__(self, out: Path):
        self.out = out
        self.meta: dict[str, Any] = {}
        self.manifest: Manifest | None = None
