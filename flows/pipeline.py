"""The `sft-pipeline` Prefect flow: plans every stage's artifact key from the settings, then runs
the selected stages in DAG order as cached Prefect tasks.

Before any work it checks the whole plan (settings, stage selection, source fingerprints, and that
every stage it reuses already has an intact artifact), so a mistake fails in seconds with one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger
from prefect.states import Failed, State
from prefect.transactions import transaction

from flows.notify import on_run_failed
from flows.selection import Selection, resolve
from settings.errors import UserError
from settings.models import HubPushSettings, PipelineSettings
from tasks import BY_NAME, STAGE_NAMES, hub_push
from tasks.artifacts import ArtifactStore, Manifest
from tasks.retry import gave_up, is_transient, retry_options, retry_transient
from tasks.stage import (STAGE_CACHE, StagePlan, cache_key, plan_key, stage_task,
                         verify_published)


@dataclass
class PlannedStage:
    name: str
    action: str
    """`run`, `force` or `reuse`."""
    plan: StagePlan


def plan_pipeline(settings: PipelineSettings, selection: Selection) -> list[PlannedStage]:
    """Every needed stage's key, in DAG order. Raises UserError for any mistake."""
    actions = resolve(selection)
    keys: dict[str, str] = {}
    planned = []
    for name in STAGE_NAMES:
        stage = BY_NAME[name]
        if not all(u in keys for u in stage.upstream):
            continue
        plan = plan_key(stage, stage.settings(settings), keys)
        keys[name] = plan.key
        if name in actions:
            planned.append(PlannedStage(name, actions[name], plan))
    return planned


def status_table(settings: PipelineSettings, planned: list[PlannedStage],
                 verify: bool = False) -> list[dict[str, str]]:
    """One row per stage: key, whether an intact artifact exists, its size and path."""
    store = ArtifactStore(settings.workdir)
    rows = []
    for p in planned:
        manifest, why = store.check(p.name, p.plan.key, verify=verify)
        rows.append({
            "stage": p.name, "what": BY_NAME[p.name].description, "key": p.plan.key, "cached": "yes" if manifest else f"no ({why})",
            "size": f"{manifest.size / 1e6:.1f} MB" if manifest else "-",
            "path": str(store.path(p.name, p.plan.key)),
        })
    return rows


def _run_name() -> str:
    from prefect.runtime import flow_run

    settings = flow_run.parameters.get("settings") or {}
    name = settings.get("name", "run") if isinstance(settings, dict) else settings.name
    return f"{name}-{flow_run.scheduled_start_time:%Y%m%d-%H%M%S}"


@flow(name="sft-pipeline", flow_run_name=_run_name, log_prints=True,
      on_failure=[on_run_failed], on_crashed=[on_run_failed])
def sft_pipeline(
    settings: PipelineSettings = PipelineSettings(),
    from_stage: str | None = None,
    only: list[str] | None = None,
    until: str | None = None,
    force: list[str] | None = None,
    verify: bool = False,
) -> dict[str, Manifest]:
    """Fine-tune a reasoning LLM: download → patch_tokenizer → … as resumable cached stages.

    `from_stage` reruns a stage and everything after it; `only` runs just the named stages
    (reusing their inputs); `until` stops after a stage; `force` rebuilds stages even if cached;
    `verify` checks every reused artifact's content hashes, not only its file sizes.
    """
    log = get_run_logger()
    selection = Selection(from_stage, list(only or []), until, list(force or []))
    try:
        return _run(settings, selection, verify, log)
    except UserError as e:
        log.error("%s", e)
        return Failed(message=str(e))


StageName = Literal[tuple(STAGE_NAMES)]  # type: ignore[valid-type]


@flow(name="rerun-stage", flow_run_name=_run_name, log_prints=True,
      on_failure=[on_run_failed], on_crashed=[on_run_failed])
def rerun_stage(settings: PipelineSettings = PipelineSettings(), stage: StageName = "evaluate",
                verify: bool = False) -> dict[str, Manifest]:
    """Rebuild one stage from its existing inputs (which must be built); nothing downstream runs.
    The per-stage rerun deployment: e.g. re-evaluate with new settings, re-export an iteration."""
    return sft_pipeline(settings=settings, only=[stage], force=[stage], verify=verify)


def _run(settings: PipelineSettings, selection: Selection, verify: bool, log) -> dict[str, Manifest]:
    workdir = Path(settings.workdir).resolve()
    store = ArtifactStore(workdir)
    planned = plan_pipeline(settings, selection)
    manifests: dict[str, Manifest] = {}
    for p in planned:  # reused inputs must exist before anything runs
        if p.action == "reuse":
            manifest, why = store.check(p.name, p.plan.key, verify=verify)
            if manifest is None:
                raise UserError(f"stage {p.name} is needed as input but its artifact {p.plan.key} is "
                                f"{why}; run it first (drop --only/--from) or `rsft run --until {p.name}`")
            manifests[p.name] = manifest
    status: dict[str, str] = {}
    for p in planned:
        if p.action == "reuse":
            status[p.name] = "reused (not selected)"
            continue
        stage = BY_NAME[p.name]
        upstream = {u: manifests[u] for u in stage.upstream}
        existing, _ = store.check(p.name, p.plan.key, verify=verify)
        if existing and existing.inputs != {u: m.content_hash for u, m in upstream.items()}:
            existing = None  # built from other upstream content: never trusted
        force = p.action == "force"
        task = stage_task.with_options(
            name=p.name, task_run_name=p.name, refresh_cache=force or existing is None,
            cache_policy=STAGE_CACHE.configure(key_storage=workdir / "prefect" / "cache-keys"),
            result_storage=workdir / "prefect" / "results",
            **(retry_options(settings.retries) if stage.network else {}),
        )
        args = dict(stage=stage, section=stage.settings(settings), plan=p.plan, upstream=upstream,
                    workdir=str(workdir), cache_key=cache_key(p.plan, upstream, workdir), force=force,
                    verify=verify)
        state, manifest = _build(task, args, stage, existing, settings, log)
        manifests[p.name] = manifest
        status[p.name] = state.name
        if stage.report and (rows := stage.report(manifest)):
            create_table_artifact(rows, key=f"{p.name.replace('_', '-')}-report",
                                  description=f"{p.name}: {stage.description}")
        if stage.markdown:
            create_markdown_artifact(stage.markdown(manifest),
                                     key=f"{p.name.replace('_', '-')}-summary",
                                     description=f"{p.name}: {stage.description}")
    if settings.export.push.repo and "export" in manifests:
        _push(manifests, settings, log)
    _summary_artifact(manifests, status)
    return manifests


def _build(task, args: dict, stage, existing: Manifest | None, settings: PipelineSettings,
           log) -> tuple[State, Manifest]:
    """Run a stage's task and check what it published, in one transaction: if the check fails,
    the transaction rolls back — the stage task's rollback hook withdraws the artifact and no
    cache record is written — so nothing a later run would trust is left behind."""
    name = stage.name
    with transaction():
        state = task(**args, return_state=True)
        if not state.is_failed():  # a failed task published nothing: the run fails below
            manifest = state.result()
            if state.name == "Cached":  # refresh_cache was off: `existing` is an intact artifact
                if manifest.content_hash == existing.content_hash:
                    return state, existing  # the disk's manifest: right even if the workdir moved
                log.warning("%s: cache record disagrees with the artifact on disk; refreshing",
                            name)
                state = task.with_options(refresh_cache=True)(**args, return_state=True)
                manifest = state.result()
            try:
                verify_published(stage, manifest, args["workdir"])
            except Exception as e:  # noqa: BLE001 - any failure of the check withdraws it
                raise UserError(f"{name}: the published artifact failed its verification "
                                f"({type(e).__name__}: {e}); it was rolled back — rerun to "
                                "rebuild it") from e
            return state, manifest
    if isinstance(error := state.result(raise_on_failure=False), BaseException):
        if stage.network and is_transient(error):
            raise UserError(gave_up(name, error, settings.retries)) from error
        raise error  # a bug, not a user mistake: fail with its traceback
    message = state.message or "failed"
    raise UserError(message if message.startswith(name) else f"{name}: {message}")


@task(name="push", task_run_name="push", retry_condition_fn=retry_transient)
def push_task(export: Manifest, card: str, push: HubPushSettings) -> dict:
    return hub_push.push(export, card, push, get_run_logger())


def _push(manifests: dict[str, Manifest], settings: PipelineSettings, log) -> None:
    """Upload the export, with the evaluated model card when `evaluate` ran (idempotent)."""
    card_file = (manifests["evaluate"].dir / "model_card.md" if "evaluate" in manifests
                 else manifests["export"].dir / "README.md")
    state = push_task.with_options(**retry_options(settings.retries))(
        manifests["export"], card_file.read_text(), settings.export.push, return_state=True)
    if state.is_failed():
        error = state.result(raise_on_failure=False)
        if isinstance(error, BaseException) and is_transient(error):
            raise UserError(gave_up("push", error, settings.retries)) from error
        raise error if isinstance(error, BaseException) else RuntimeError(state.message)
    result = state.result()
    create_table_artifact([{"file": f} for f in result["files"]], key="push-files",
                          description=f"{'pushed' if result['pushed'] else 'not pushed'} to "
                                      f"{result['repo']}@{result['revision']}")


def _summary_artifact(manifests: dict[str, Manifest], status: dict[str, str]) -> None:
    rows = ["| stage | state | key | size | path |", "|---|---|---|---|---|"]
    for name, m in manifests.items():
        rows.append(f"| {name} | {status[name]} | `{m.key}` | {m.size / 1e6:.1f} MB | `{m.path}` |")
    create_markdown_artifact("\n".join(rows), key="sft-pipeline-stages",
                             description="Stage artifacts of this run")
