"""The `sft-pipeline` Prefect flow: plans every stage's artifact key from the settings, then runs
the selected stages as the DAG they form: each stage's task is submitted with its upstream tasks'
futures as inputs, so it starts when those are done, independent branches (download → convert,
dataset → tokenize) run at the same time, and the Prefect UI draws the DAG's edges. A failed
stage stops only what depends on it; the run then fails with that stage's one line.

Before any work it checks the whole plan (settings, stage selection, source fingerprints, and that
every stage it reuses already has an intact artifact), so a mistake fails in seconds with one line.
Whether a stage builds or reuses its artifact is decided by the artifact store alone
(`tasks/stage.py:execute`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.states import Failed, State
from pydantic import ValidationError

from flows.notify import on_run_failed
from flows.selection import Selection, resolve
from settings.errors import UserError
from settings.models import HubPushSettings, PipelineSettings
from settings.naming import run_label
from tasks import BY_NAME, STAGE_NAMES, hub_push
from tasks.artifacts import ArtifactStore, Manifest
from tasks.retry import gave_up, is_transient, retry_options, retry_transient
from tasks.stage import StagePlan, plan_key, run_artifact_key, stage_task


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
    """`<preset>-<what differs from it>-<start time>`, e.g. `tiny-lr2e-5-iters20-20261202-101500`
    (`settings/naming.py`); artifact keys start with it (`tasks/stage.py:run_artifact_key`)."""
    from prefect.runtime import flow_run

    settings = flow_run.parameters.get("settings") or PipelineSettings()
    try:  # a deployment passes a dict; the flow validates it (and says what is wrong) next
        label = run_label(PipelineSettings.model_validate(settings) if isinstance(settings, dict)
                          else settings)
    except ValidationError:
        label = str(settings.get("name", "run"))
    return f"{label}-{flow_run.scheduled_start_time:%Y%m%d-%H%M%S}"


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
    except UserError as e:  # a mistake found before or after the stages (plan, push)
        return Failed(message=str(e))


StageName = Literal[tuple(STAGE_NAMES)]  # type: ignore[valid-type]


@flow(name="rerun-stage", flow_run_name=_run_name, log_prints=True,
      on_failure=[on_run_failed], on_crashed=[on_run_failed])
def rerun_stage(settings: PipelineSettings = PipelineSettings(), stage: StageName = "evaluate",
                verify: bool = False) -> dict[str, Manifest]:
    """Rebuild one stage from its existing inputs (which must be built); nothing downstream runs.
    The per-stage rerun deployment: e.g. re-evaluate with new settings, re-export an iteration."""
    return sft_pipeline(settings=settings, only=[stage], force=[stage], verify=verify)


def _run(settings: PipelineSettings, selection: Selection, verify: bool,
         log) -> dict[str, Manifest] | State:
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
    futures: dict[str, PrefectFuture] = {}
    for p in planned:  # DAG order: a stage's upstream futures exist when it is submitted
        if p.action == "reuse":
            continue
        stage = BY_NAME[p.name]
        task = stage_task.with_options(
            name=p.name, task_run_name=p.name,
            **(retry_options(settings.retries) if stage.network else {}))
        # Futures as inputs: Prefect waits for them, records the edge, and leaves the stage
        # `NotReady` if one failed.
        upstream = {u: futures.get(u) or manifests[u] for u in stage.upstream}
        futures[p.name] = task.submit(stage=stage, section=stage.settings(settings), plan=p.plan,
                                      upstream=upstream, workdir=str(workdir),
                                      force=p.action == "force", verify=verify)
    for future in futures.values():  # every branch runs to its end before the run fails
        future.wait()
    status = {name: "reused (not selected)" for name in manifests}
    failures = []
    for name, future in futures.items():
        state = future.state
        status[name] = state.name
        if state.is_completed():
            manifests[name] = future.result()
        elif state.is_failed():
            failures.append(_failure(name, state, settings))
    _summary_artifact(manifests, status)
    if failures:  # the failed stages' own lines, as the run's state
        return Failed(message="; ".join(failures))
    if settings.export.push.repo and "export" in manifests:
        _push(manifests, settings, log)
    return manifests


def _failure(name: str, state, settings: PipelineSettings) -> str:
    """A failed stage's one line. A stage fails with its message for a user mistake; a network
    stage that gave up on transient errors says so; anything else is a bug: raised, traceback."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, BaseException):
        if BY_NAME[name].network and is_transient(error):
            return gave_up(name, error, settings.retries)
        raise error
    return state.message or f"{name}: failed"


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
    create_table_artifact([{"file": f} for f in result["files"]], key=run_artifact_key("push-files"),
                          description=f"{'pushed' if result['pushed'] else 'not pushed'} to "
                                      f"{result['repo']}@{result['revision']}")


def _summary_artifact(manifests: dict[str, Manifest], status: dict[str, str]) -> None:
    rows = ["| stage | state | key | size | path |", "|---|---|---|---|---|"]
    for name in (n for n in STAGE_NAMES if n in status):
        if m := manifests.get(name):
            rows.append(f"| {name} | {status[name]} | `{m.key}` | {m.size / 1e6:.1f} MB | `{m.path}` |")
        else:
            rows.append(f"| {name} | {status[name]} | - | - | - |")
    create_markdown_artifact("\n".join(rows), key=run_artifact_key("sft-pipeline-stages"),
                             description="Stage artifacts of this run")
