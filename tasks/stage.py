"""What a stage is, how its key is computed, and the one thin Prefect wrapper every stage shares.

A stage module defines a plain `build` function (settings + upstream artifact dirs → files in
`out`, facts in `meta`) and a `Stage` record naming its version, upstream stages and settings
section. `execute` is the one place that decides whether a stage runs: under the artifact's
builder lock it asks the store whether an intact artifact built from the same upstream content
exists (reuse), else builds, publishes, verifies what it published and withdraws it if that
fails. `stage_task` wraps `execute` as a Prefect task with no Prefect cache: a reused artifact
comes back as a `Cached` state, so the UI still shows it.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import Timeout
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.logging import get_run_logger
from prefect.states import Completed, Failed, State
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
    store: ArtifactStore | None = None
    """The store the artifact is published into (to find another stage's scratch folder)."""
    options: dict[str, Any] | None = None
    """What the plan tells the build beyond its settings, never part of the key (`train`: the
    checkpoints to keep for evaluation)."""
    iteration: int | None = None
    """For a per-checkpoint stage (`Stage.checkpoint_of`): the iteration it is built for."""
    force: bool = False
    """The build was forced (`--force`, `--from`): a resumable stage starts its run afresh
    instead of resuming (`train` moves the old run aside)."""


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
    lineage: Callable[[Any], dict[str, Any]] | None = None
    """The settings that make the stage's resumable run what it is (`train`: all but its
    length and checkpoint cadence): its scratch folder is keyed by them instead of the artifact
    key, so artifacts that differ only in the rest (a longer run) share and continue one run."""
    checkpoint_of: str | None = None
    """A per-checkpoint stage: it reads one checkpoint of this upstream stage's run and is
    keyed by that run's lineage and the iteration instead of the upstream artifact's key (the
    same checkpoint of a longer run is the same artifact). Its recorded input is the run's id
    and the iteration (`checkpoint_identity`)."""


def key_settings(section: BaseModel) -> dict[str, Any]:
    """The section as JSON, without fields marked `affects_key=False` (recursively)."""
    data = section.model_dump(mode="json")
    for name, info in type(section).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("affects_key") is False:
            data.pop(name, None)
        elif extra.get("key_when_set") and getattr(section, name) is None:
            data.pop(name, None)  # a field added later: unset, the keys stay what they were
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
    scratch: str = ""
    """Key of the stage's scratch folder: its run lineage's (`Stage.lineage`), else the key."""
    iteration: int | None = None
    """The checkpoint of `Stage.checkpoint_of` this plan is for (per-checkpoint stages)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Told to the build, not part of the key (`BuildContext.options`)."""
    label: str = ""
    """The task run's name when it is not the stage's: `export@6` for one of several
    checkpoints' instances."""

    @property
    def name(self) -> str:
        return self.label or self.stage


def plan_key(stage: Stage, section: BaseModel, upstream_keys: dict[str, str],
             iteration: int | None = None, options: dict[str, Any] | None = None,
             label: str = "") -> StagePlan:
    """The stage's key from its settings, fingerprint and upstream keys. A per-checkpoint
    stage's `checkpoint_of` upstream counts as `<that stage's scratch key>@<iteration>`: pass
    the scratch key for it in `upstream_keys`."""
    fingerprint = stage.fingerprint(section) if stage.fingerprint else {}
    upstream = {u: upstream_keys[u] for u in stage.upstream}
    if stage.checkpoint_of:
        if iteration is None:
            raise ValueError(f"stage {stage.name} is planned per checkpoint: give the iteration")
        upstream[stage.checkpoint_of] = f"{upstream[stage.checkpoint_of]}@{iteration}"
    material = {
        "stage": stage.name,
        "version": stage.version,
        "settings": key_settings(section),
        "fingerprint": fingerprint,
        "upstream": upstream,
    }
    key = compute_key(material)
    scratch = (compute_key({**material, "settings": stage.lineage(section), "lineage": True})
               if stage.lineage else key)
    return StagePlan(stage.name, key, material, fingerprint, scratch, iteration,
                     dict(options or {}), label)


RUN_RECORD = "run.json"
"""A stage with a resumable scratch run records the run's id in this file of its artifact (a
record file: outside the content hash)."""


def checkpoint_identity(manifest: Manifest, iteration: int) -> str:
    """What a per-checkpoint stage records as its input: the id of the run that made the
    checkpoint (a new one when its scratch folder starts over) and the iteration, so a
    checkpoint retrained from scratch (not bit-identical on GPUs) is rebuilt, while the same
    checkpoint reached by a longer run of that lineage is reused."""
    record = manifest.dir / RUN_RECORD
    run = json.loads(record.read_text())["run_id"] if record.is_file() else manifest.content_hash
    return f"{run}@{iteration}"


def execute(stage: Stage, section: BaseModel, plan: StagePlan, upstream: dict[str, Manifest],
            store: ArtifactStore, force: bool = False, verify: bool = False,
            log: logging.Logger | None = None) -> tuple[Manifest, bool]:
    """(manifest, built). Reuse the artifact if it is intact and was built from this exact
    upstream content; otherwise build it, publish it atomically and verify it in its final place
    (withdrawn again if that fails). Idempotent; concurrent callers of one key build it once."""
    log = log or logging.getLogger(f"rsft.{stage.name}")
    inputs = {u: m.content_hash for u, m in upstream.items()}
    if stage.checkpoint_of and plan.iteration is not None:
        inputs[stage.checkpoint_of] = checkpoint_identity(upstream[stage.checkpoint_of],
                                                          plan.iteration)
    lock = store.lock(stage.name, plan.key)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another run is building %s; waiting for it", plan.key)
        lock.acquire()
    try:
        if not force:  # checked under the lock: a concurrent run may just have published it
            existing, why = store.check(stage.name, plan.key, verify=verify)
            if existing is not None and existing.inputs == inputs:
                log.info("reusing %s", existing.dir)
                return existing, False
            if existing is not None:
                why = "its upstream artifacts changed"
            log.info("building %s (%s)", store.path(stage.name, plan.key), why)
        with store.publish(stage.name, plan.key, plan.key_material, inputs, stage.version,
                           stage.records) as build:
            stage.build(BuildContext(section, build.out, upstream, plan.fingerprint, build.meta,
                                     log, store.scratch(stage.name, plan.scratch or plan.key),
                                     store, plan.options, plan.iteration, force))
        assert build.manifest is not None
        try:
            verify_published(stage, build.manifest, store)
        except Exception as e:  # noqa: BLE001 - whatever the check raised, withdraw the artifact
            ArtifactStore.unpublish(build.manifest.dir)
            raise UserError(f"the published artifact failed its verification ({type(e).__name__}: "
                            f"{e}); it was withdrawn: rerun to rebuild it") from e
    finally:
        lock.release()
    log.info("published %s (%d files, %.1f MB)", build.manifest.dir, len(build.manifest.files),
             build.manifest.size / 1e6)
    return build.manifest, True


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


@task(cache_policy=NO_CACHE, persist_result=False)
def stage_task(stage: Stage, section: BaseModel, plan: StagePlan, upstream: dict[str, Manifest],
               workdir: str, force: bool = False, verify: bool = False) -> State:
    """One pipeline stage as a Prefect task (the flow names it after the stage): `Completed`
    when built, `Cached` when the store already had it, `Failed` with one line (the stage's name
    first) for a user mistake. The stage's report and summary become Prefect artifacts."""
    log = get_run_logger()
    store = ArtifactStore(Path(workdir))
    try:
        slots = stage.gpus(section) if stage.gpus else 0
        with _gpu_slots(slots, log) if slots else nullcontext():
            manifest, built = execute(stage, section, plan, upstream, store, force, verify, log)
    except UserError as e:
        return Failed(message=f"{plan.name}: {e}")
    _show(stage, manifest, plan)
    return Completed(data=manifest) if built else Completed(name="Cached", data=manifest)


def _gpu_slots(slots: int, log):
    """Hold `slots` of the `gpu` limit (created, sized to this machine, if missing)."""
    import torch

    if ensure_gpu_limit(torch.cuda.device_count()):
        log.info("created the `%s` concurrency limit with %d slots (this machine's GPUs)",
                 GPU_LIMIT, torch.cuda.device_count())
    log.info("waiting for %d slot(s) of the `%s` concurrency limit", slots, GPU_LIMIT)
    return concurrency(GPU_LIMIT, occupy=slots, strict=True)


def run_artifact_key(what: str) -> str:
    """`<flow-run name>-<what>` as a Prefect artifact key (lowercase letters, digits, dashes):
    each run's artifacts under keys of their own, so experiments never overwrite each other's
    (the run name says what the experiment changed: `flows/pipeline.py:_run_name`). Outside a
    flow run: `what`."""
    from prefect.runtime import flow_run

    run = flow_run.get_name() if flow_run.get_id() else None
    key = f"{run}-{what}" if run else what
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", key.lower())).strip("-")


def _show(stage: Stage, manifest: Manifest, plan: StagePlan) -> None:
    """The stage's table and summary as Prefect artifacts of its task run (`export-step6-…`
    for a checkpoint's instance)."""
    key = plan.name.replace("_", "-").replace("@", "-step")
    if stage.report and (rows := stage.report(manifest)):
        create_table_artifact(rows, key=run_artifact_key(f"{key}-report"),
                              description=f"{plan.name}: {stage.description}")
    if stage.markdown:
        create_markdown_artifact(stage.markdown(manifest), key=run_artifact_key(f"{key}-summary"),
                                 description=f"{plan.name}: {stage.description}")


def inline_png(path: Path, alt: str) -> str:
    """A markdown image of a PNG as a `data:` URI, which the Prefect UI's markdown renders (a file
    name or a path on the worker would show nothing)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"


def verify_published(stage: Stage, manifest: Manifest, store: ArtifactStore) -> None:
    """Re-read every file's hash of the published artifact from its final place, then run the
    stage's own check. Raises on any difference."""
    found, why = store.check(stage.name, manifest.key, verify=True)
    if found is None or found.content_hash != manifest.content_hash:
        raise RuntimeError(f"the published artifact does not read back as built ({why})")
    if stage.verify is not None:
        stage.verify(found)
