"""What a stage is, how its key is computed, and the one thin Prefect wrapper every stage shares.

A stage module defines a plain `build` function (settings + upstream artifact dirs → files in
`out`, facts in `meta`) and a `Stage` record naming its version, upstream stages and settings
section. `execute` publishes the build atomically through the artifact store; `prefect_task`
wraps `execute` as a Prefect task whose cache key is the artifact's identity, so a reused stage
shows as `Cached` in the UI.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from filelock import Timeout
from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.concurrency.sync import concurrency
from prefect.logging import get_run_logger
from prefect.states import Failed
from prefect.transactions import get_transaction
from pydantic import BaseModel

from settings.errors import UserError
from settings.models import PipelineSettings
from tasks.artifacts import ArtifactStore, Manifest, compute_key


@dataclass
class BuildContext:
    """Everything a stage's build function may use."""

    settings: Any
    """The stage's own settings section (a pydantic model)."""
    out: Path
    """Empty directory to write the artifact into."""
    upstream: dict[str, Manifest]
    """Upstream stage name → its manifest (`.dir` is the artifact directory)."""
    fingerprint: dict[str, Any]
    """Extra key material the stage resolved at plan time (pinned revision, source stat…)."""
    meta: dict[str, Any]
    """Facts to record in the manifest (must be deterministic for the same inputs)."""
    log: logging.Logger
    scratch: Path | None = None
    """Persistent per-key work directory (resumable progress such as training checkpoints)."""


@dataclass(frozen=True)
class Stage:
    name: str
    version: str
    """Bump when the stage's code changes its output: every key of the stage changes."""
    settings: Callable[[PipelineSettings], BaseModel]
    """The settings section that affects this stage's output."""
    build: Callable[[BuildContext], None]
    upstream: tuple[str, ...] = ()
    fingerprint: Callable[[Any], dict[str, Any]] | None = None
    """Cheap, plan-time key material that settings cannot express (a hub branch's current
    commit, a local directory's file sizes and mtimes). Raises UserError on bad input."""
    description: str = ""
    report: Callable[[Manifest], list[dict[str, Any]]] | None = None
    """Rows of a table the flow shows as a Prefect artifact after the stage (e.g. checks)."""
    markdown: Callable[[Manifest], str] | None = None
    """A markdown summary the flow shows as a Prefect artifact after the stage."""
    network: bool = False
    """The stage talks to a network (the Hub): its transient failures are retried
    (settings `retries`)."""
    verify: Callable[[Manifest], None] | None = None
    """The stage's own check of its artifact in its final place (after every file's hash was
    re-read from there), run right after publishing; raises to roll the artifact back."""
    records: tuple[str, ...] = ()
    """Globs of files that record how the build went (timings) rather than what it made: kept
    and verified, but outside the content hash (logs always are)."""
    gpus: Callable[[Any], int] | None = None
    """GPUs the stage occupies with these settings on this machine (0 on CPU): held as slots of
    the `gpu` global concurrency limit while it builds, so two runs never share GPUs."""


def key_settings(section: BaseModel) -> dict[str, Any]:
    """The section as JSON, without fields marked `affects_key=False` (recursively)."""
    data = section.model_dump(mode="json")
    for name, info in type(section).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("affects_key") is False:
            data.pop(name, None)
        elif isinstance(value := getattr(section, name), BaseModel):
            data[name] = key_settings(value)
    return data


@dataclass(frozen=True)
class StagePlan:
    """A stage's identity for one settings object: computed before anything runs."""

    stage: str
    key: str
    key_material: dict[str, Any]
    fingerprint: dict[str, Any]


def plan_key(stage: Stage, section: BaseModel, upstream_keys: dict[str, str]) -> StagePlan:
    fingerprint = stage.fingerprint(section) if stage.fingerprint else {}
    material = {
        "stage": stage.name,
        "version": stage.version,
        "settings": key_settings(section),
        "fingerprint": fingerprint,
        "upstream": {u: upstream_keys[u] for u in stage.upstream},
    }
    return StagePlan(stage.name, compute_key(material), material, fingerprint)


def cache_key(plan: StagePlan, upstream: dict[str, Manifest], workdir: Path) -> str:
    """Prefect cache key: the artifact key plus the exact content of the upstream artifacts, so a
    forced upstream rebuild that changed its output changes every downstream cache key. The
    workdir is part of it because Prefect's records hold absolute paths into it. (The flow
    refreshes a record whose artifact is missing, corrupt or built from other inputs.)"""
    parts = [str(workdir), plan.key, *(f"{u}={m.content_hash}" for u, m in sorted(upstream.items()))]
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
    return f"rsft-{plan.stage}-{plan.key}-{digest}"


def execute(stage: Stage, section: BaseModel, plan: StagePlan, upstream: dict[str, Manifest],
            store: ArtifactStore, force: bool = False, verify: bool = False,
            log: logging.Logger | None = None,
            on_publish: Callable[[Manifest], None] | None = None) -> Manifest:
    """Reuse the artifact if it is intact and was built from this exact upstream content;
    otherwise build and publish it atomically (and call `on_publish`). Idempotent."""
    log = log or logging.getLogger(f"rsft.{stage.name}")
    inputs = {u: m.content_hash for u, m in upstream.items()}
    lock = store.lock(stage.name, plan.key)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s: another run is building %s; waiting for it", stage.name, plan.key)
        lock.acquire()
    try:
        if not force:  # checked under the lock: a concurrent run may just have published it
            existing, why = store.check(stage.name, plan.key, verify=verify)
            if existing is not None and existing.inputs == inputs:
                log.info("%s: reusing %s", stage.name, existing.dir)
                return existing
            if existing is not None:
                why = "its upstream artifacts changed"
            log.info("%s: building %s (%s)", stage.name, store.path(stage.name, plan.key), why)
        with store.publish(stage.name, plan.key, plan.key_material, inputs, stage.version,
                           stage.records) as build:
            stage.build(BuildContext(section, build.out, upstream, plan.fingerprint, build.meta, log,
                                     store.scratch(stage.name, plan.key)))
    finally:
        lock.release()
    assert build.manifest is not None
    if on_publish is not None:
        on_publish(build.manifest)
    log.info("%s: published %s (%d files, %.1f MB)", stage.name, build.manifest.dir,
             len(build.manifest.files), build.manifest.size / 1e6)
    return build.manifest


# -- the thin Prefect wrapper ------------------------------------------------------------------
GPU_LIMIT = "gpu"
"""Global concurrency limit whose slots are GPUs (created by `rsft deploy`, or sized to the visible
GPUs when a GPU stage first runs and it does not exist)."""


def ensure_gpu_limit(gpus: int) -> bool:
    """Create the `gpu` global concurrency limit with `gpus` slots unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            return False
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(
                name=GPU_LIMIT, limit=max(1, gpus)))
            return True
STAGE_CACHE = CacheKeyFnPolicy(cache_key_fn=lambda _ctx, params: params["cache_key"])


@task(persist_result=True, cache_policy=STAGE_CACHE)
def stage_task(stage: Stage, section: BaseModel, plan: StagePlan, upstream: dict[str, Manifest],
               workdir: str, cache_key: str, force: bool = False, verify: bool = False) -> Manifest:
    """One pipeline stage as a Prefect task (the flow names it after the stage). A user mistake
    fails the task with its one-line message instead of a traceback."""
    log = get_run_logger()
    slots = stage.gpus(section) if stage.gpus else 0
    run = partial(execute, stage, section, plan, upstream, ArtifactStore(Path(workdir)),
                  force=force, verify=verify, log=log, on_publish=_record_publication)
    try:
        if not slots:
            return run()
        import torch

        if ensure_gpu_limit(torch.cuda.device_count()):
            log.info("created the `%s` concurrency limit with %d slots (this machine's GPUs)",
                     GPU_LIMIT, torch.cuda.device_count())
        log.info("%s: waiting for %d slot(s) of the `%s` concurrency limit", stage.name, slots,
                 GPU_LIMIT)
        with concurrency(GPU_LIMIT, occupy=slots, strict=True):
            return run()
    except UserError as e:
        return Failed(message=f"{stage.name}: {e}")


# -- transactions: a stage failing its verification rolls its artifact back ---------------------
def _record_publication(manifest: Manifest) -> None:
    """Remember, in the task's transaction, the artifact this attempt published (a reused one is
    never rolled back)."""
    if (txn := get_transaction()) is not None:
        txn.set("published", manifest.path)


@stage_task.on_rollback
def _unpublish(txn) -> None:
    if path := txn.get("published", None):
        ArtifactStore.unpublish(Path(path))


class VerificationError(RuntimeError):
    """A freshly published artifact failed its verification (it was rolled back)."""


def verify_published(stage: Stage, manifest: Manifest, workdir: str) -> None:
    """Re-read every file's hash of the published artifact from its final place, then run the
    stage's own check. Raises on any difference (→ the flow rolls the artifact back)."""
    store = ArtifactStore(Path(workdir))
    found, why = store.check(stage.name, manifest.key, verify=True)
    if found is None or found.content_hash != manifest.content_hash:
        raise VerificationError(f"the published artifact does not read back as built ({why})")
    if stage.verify is not None:
        stage.verify(found)
