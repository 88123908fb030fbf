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
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.states import Failed, State

from flows.notify import on_run_failed
from flows.selection import Selection, resolve
from settings.errors import UserError
from settings.loader import DEFAULT_PRESET, dump_settings, leaf_keys, load_settings
from settings.models import HubPushSettings, PipelineSettings
from tasks import BY_NAME, STAGE_NAMES, hub_push
from tasks.artifacts import ArtifactStore, Manifest
from tasks.retry import gave_up, is_transient, retry_options, retry_transient
from tasks.stage import StagePlan, plan_key, stage_task


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
    check_model_fit(settings, {p.name for p in planned}, keys["download"])
    return planned


def check_model_fit(settings: PipelineSettings, stages: set[str], download_key: str) -> None:
    """Settings that the model's config decides, checked before any stage runs whenever that
    config is known (a built-in or local model, or a Hub model already downloaded); otherwise
    `tokenize` would rebuild for an hour before `train` refuses its sequence length."""
    from tasks.download import known_config

    if not {"tokenize", "train"} & stages:
        return
    manifest, _ = ArtifactStore(settings.workdir).check("download", download_key)
    config = known_config(settings.download, manifest.dir if manifest else None) or {}
    max_positions = config.get("max_position_embeddings")
    if max_positions and settings.tokenize.seq_length > max_positions:
        raise UserError(f"tokenize.seq_length {settings.tokenize.seq_length} is above the model's "
                        f"max_position_embeddings {max_positions} ({settings.download.source}); "
                        "lower tokenize.seq_length")


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

    params = flow_run.parameters
    try:
        name = resolve_settings(params.get("preset"), params.get("settings")).name
    except UserError:  # the run fails at its start with that line
        name = Path(str(params.get("preset") or DEFAULT_PRESET)).stem
    return f"{name}-{flow_run.scheduled_start_time:%Y%m%d-%H%M%S}"


def resolve_settings(preset: str | None, settings: dict[str, Any] | None) -> PipelineSettings:
    """A flow run's settings: its `preset` with the partial `settings` merged onto it."""
    return load_settings(preset, partial=settings)


@flow(name="sft-pipeline", flow_run_name=_run_name, log_prints=True,
      on_failure=[on_run_failed], on_crashed=[on_run_failed])
def sft_pipeline(
    preset: str = DEFAULT_PRESET,
    settings: dict[str, Any] | None = None,
    from_stage: str | None = None,
    only: list[str] | None = None,
    until: str | None = None,
    force: list[str] | None = None,
    verify: bool = False,
) -> dict[str, Manifest]:
    """Fine-tune a reasoning LLM: download → patch_tokenizer → … as resumable cached stages.

    Args:
        preset: The settings to start from: a preset name (`tiny`, `thinkless-warmup-1.5b`;
            settings/presets/) or the path of a settings YAML file on the machine that runs the
            flow.
        settings: Only the settings to change, nested by section, merged onto the preset as
            `rsft run --set` does, e.g. {"train": {"train_iters": 20, "lr": 2e-5}} (from the
            CLI: `prefect deployment run NAME -p settings='{"train": {"train_iters": 20}}'`). A
            section merges key by key; any other value, a list too, replaces the preset's. Empty:
            the preset as it is. Checked when the run starts: a mistake fails the run with one
            line. Every setting: `rsft settings show --docs`.
        from_stage: Rerun this stage and everything after it, ignoring their caches.
        only: Run just these stages, reusing their inputs (which must be built).
        until: Stop after this stage.
        force: Rebuild these stages even if cached (`all`: every stage).
        verify: Check every reused artifact's content hashes, not only its file sizes.
    """
    log = get_run_logger()
    selection = Selection(from_stage, list(only or []), until, list(force or []))
    try:
        resolved = resolve_settings(preset, settings)
        _settings_artifact(resolved, preset, settings)
        return _run(resolved, selection, verify, log)
    except UserError as e:  # a mistake found before or after the stages (settings, plan, push)
        return Failed(message=str(e))


StageName = Literal[tuple(STAGE_NAMES)]  # type: ignore[valid-type]


@flow(name="rerun-stage", flow_run_name=_run_name, log_prints=True,
      on_failure=[on_run_failed], on_crashed=[on_run_failed])
def rerun_stage(preset: str = DEFAULT_PRESET, settings: dict[str, Any] | None = None,
                stage: StageName = "evaluate", verify: bool = False) -> dict[str, Manifest]:
    """Rebuild one stage from its existing inputs (which must be built); nothing downstream runs.
    The per-stage rerun deployment: e.g. re-evaluate with new settings, re-export an iteration.

    Args:
        preset: The settings to start from: a preset name (`tiny`, `thinkless-warmup-1.5b`) or
            the path of a settings YAML file on the machine that runs the flow.
        settings: Only the settings to change, nested by section, merged onto the preset as
            `rsft run --set` does, e.g. {"export": {"iteration": 6}}. Checked when the run
            starts.
        stage: The stage to rebuild.
        verify: Check every reused artifact's content hashes, not only its file sizes.
    """
    return sft_pipeline(preset=preset, settings=settings, only=[stage], force=[stage],
                        verify=verify)


def _settings_artifact(resolved: PipelineSettings, preset: str,
                       override: dict[str, Any] | None) -> None:
    """The run's resolved settings in the UI: its parameters hold only the preset's name and
    the keys changed."""
    changed = ", ".join(f"`{k}`" for k in leaf_keys(override or {})) or "none"
    create_markdown_artifact(
        f"### Settings\n\npreset `{preset}`; changed: {changed}\n\n```yaml\n"
        f"{dump_settings(resolved)}```", key="sft-pipeline-settings",
        description="The settings this run resolved (preset + override)")


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
    create_table_artifact([{"file": f} for f in result["files"]], key="push-files",
                          description=f"{'pushed' if result['pushed'] else 'not pushed'} to "
                                      f"{result['repo']}@{result['revision']}")


def _summary_artifact(manifests: dict[str, Manifest], status: dict[str, str]) -> None:
    rows = ["| stage | state | key | size | path |", "|---|---|---|---|---|"]
    for name in (n for n in STAGE_NAMES if n in status):
        if m := manifests.get(name):
            rows.append(f"| {name} | {status[name]} | `{m.key}` | {m.size / 1e6:.1f} MB | `{m.path}` |")
        else:
            rows.append(f"| {name} | {status[name]} | - | - | - |")
    create_markdown_artifact("\n".join(rows), key="sft-pipeline-stages",
                             description="Stage artifacts of this run")
