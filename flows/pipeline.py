"""The `sft-pipeline` Prefect flow: plans every stage's artifact key from the settings, then runs
the selected stages as the DAG they form: each stage's task is submitted with its upstream tasks'
futures as inputs, so it starts when those are done, independent branches (download → convert,
dataset → tokenize) run at the same time, and the Prefect UI draws the DAG's edges. A failed
stage stops only what depends on it; the run then fails with that stage's one line.

Before any work it checks the whole plan (settings, stage selection, source fingerprints, and that
every stage it reuses already has an intact artifact), so a mistake fails in seconds with one line.
Whether a stage builds or reuses its artifact is decided by the artifact store alone
(`tasks/stage.py:execute`).

With `evaluate.checkpoints` other than `last`, the plan has one `export@N` and `evaluate@N` per
chosen intermediate checkpoint beside the final `export`/`evaluate`, each keyed by the training
run's lineage and N (not its length, so a longer run reuses them), and a `scores` stage over
them all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.states import Failed, State
from pydantic import BaseModel, ValidationError

from flows.notify import on_run_failed
from flows.selection import Selection, resolve
from settings.errors import UserError
from settings.loader import DEFAULT_PRESET, dump_settings, leaf_keys, load_settings
from settings.models import HubPushSettings, PipelineSettings
from settings.naming import run_label
from tasks import BY_NAME, STAGE_NAMES, hub_push, scores
from tasks import train as train_stage
from tasks.artifacts import ArtifactStore, Manifest
from tasks.retry import gave_up, is_transient, retry_options, retry_transient
from tasks.stage import Stage, StagePlan, plan_key, run_artifact_key, stage_task


@dataclass
class PlannedStage:
    name: str
    """The task run's name: the stage's, or `<stage>@<iteration>` for an intermediate
    checkpoint's export and evaluation."""
    action: str
    """`run`, `force` or `reuse`."""
    plan: StagePlan
    stage: Stage | None = None
    section: BaseModel | None = None
    """The settings section the stage builds with."""
    upstream: dict[str, str] = field(default_factory=dict)
    """Upstream stage (as the build sees it) → the planned task it comes from."""


def chosen_checkpoints(settings: PipelineSettings) -> list[int]:
    """The intermediate iterations `evaluate.checkpoints` asks for (the final one is always the
    normal `export`/`evaluate`). Raises UserError for an iteration the run does not save."""
    train, wanted = settings.train, settings.evaluate.checkpoints
    if wanted == "last":
        return []
    if settings.export.iteration is not None:
        raise UserError("export.iteration and evaluate.checkpoints cannot be combined: list the "
                        "iterations in evaluate.checkpoints (or set it to last)")
    saved = train.saved_iterations()
    if wanted != "all" and (unsaved := [i for i in wanted if i not in saved]):
        raise UserError(f"evaluate.checkpoints: iteration {', '.join(map(str, unsaved))} is not "
                        f"saved by this run; it saves {', '.join(map(str, saved))} (every "
                        f"train.save_interval={train.save_interval} steps and the last)")
    return [i for i in (saved if wanted == "all" else wanted) if i != train.train_iters]


def resolve_epochs(settings: PipelineSettings, tokenize_key: str) -> PipelineSettings | None:
    """The settings with `train.epochs` resolved to `train_iters` from the tokenize artifact of
    this plan (the settings as they are without epochs); None while that artifact is not built
    (every key from `train` on depends on the step count: the final checkpoint's iteration)."""
    if settings.train.epochs is None:
        return settings
    tokenized, _ = ArtifactStore(settings.workdir).check("tokenize", tokenize_key)
    if tokenized is None:
        return None
    steps = train_stage.epoch_steps(settings.train, tokenized.dir)
    return settings.model_copy(update={"train": settings.train.with_steps(steps)})


def _per_checkpoint(name: str) -> bool:
    """The stage reads one training checkpoint, itself or through its upstream (export,
    evaluate)."""
    stage = BY_NAME[name]
    return stage.checkpoint_of is not None or any(_per_checkpoint(u) for u in stage.upstream)


def plan_pipeline(settings: PipelineSettings, selection: Selection) -> list[PlannedStage]:
    """Every needed stage's key, in DAG order. Raises UserError for any mistake."""
    actions = resolve(selection)
    keys: dict[str, str] = {}
    plans: dict[str, StagePlan] = {}
    planned = []
    for name in STAGE_NAMES:
        stage = BY_NAME[name]
        if not all(u in keys for u in stage.upstream):
            continue
        if name == "train":
            if (resolved := resolve_epochs(settings, keys["tokenize"])) is None:
                # `train.epochs` waits for the tokenize artifact: the flow plans the rest once
                # it is built (`_run`)
                check_model_fit(settings, {p.name for p in planned}, keys["download"])
                return planned
            settings = resolved
            intermediate = chosen_checkpoints(settings)
            final = settings.export.iteration or settings.train.train_iters
        section = stage.settings(settings)
        if not _per_checkpoint(name):
            options = {"keep": intermediate} if name == "train" else {}
            plans[name] = plan_key(stage, section, keys, options=options)
            keys[name] = plans[name].key
            if name in actions:
                planned.append(PlannedStage(name, actions[name], plans[name], stage, section,
                                            {u: u for u in stage.upstream}))
            continue
        if stage.checkpoint_of:  # the iteration is in the upstream key, not in the settings
            section = section.model_copy(update={"iteration": None})
        for iteration in [*intermediate, final]:
            node = name if iteration == final else f"{name}@{iteration}"
            upstream = {u: f"{u}@{iteration}" if _per_checkpoint(u) and iteration != final else u
                        for u in stage.upstream}
            upstream_keys = {u: keys[n] for u, n in upstream.items()}
            if stage.checkpoint_of:
                upstream_keys[stage.checkpoint_of] = plans[stage.checkpoint_of].scratch
            plan = plan_key(stage, section, upstream_keys, iteration=iteration,
                            label=node if node != name else "")
            keys[node] = plan.key
            if name in actions:
                planned.append(PlannedStage(node, actions[name], plan, stage, section, upstream))
    if settings.evaluate.checkpoints != "last" and actions.get("evaluate", "reuse") != "reuse":
        evaluations = [p.name for p in planned if p.stage.name == "evaluate"]
        stage = dataclasses.replace(scores.STAGE, upstream=tuple(evaluations))
        section = stage.settings(settings)
        planned.append(PlannedStage("scores", actions["evaluate"],
                                    plan_key(stage, section, keys), stage, section,
                                    {n: n for n in evaluations}))
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
        manifest, why = store.check(p.plan.stage, p.plan.key, verify=verify)
        what = p.stage.description
        if p.name == "train" and p.section.epochs is not None:
            what += f"; train_iters: {p.section.train_iters} (from epochs {p.section.epochs:g})"
        rows.append({
            "stage": p.name, "what": what, "key": p.plan.key, "cached": "yes" if manifest else f"no ({why})",
            "size": f"{manifest.size / 1e6:.1f} MB" if manifest else "-",
            "path": str(store.path(p.plan.stage, p.plan.key)),
        })
    return rows


def check_checkpoints(planned: list[PlannedStage], store: ArtifactStore) -> None:
    """Every intermediate checkpoint an export must still be built from exists in the training
    run's folder, or this run's training will make it; else one line naming the fix."""
    from megatron_bridge import checkpoint
    from megatron_bridge.training.state import resume_point

    train = next((p for p in planned if p.name == "train"), None)
    if train is None:
        return
    run = store.scratch("train", train.plan.scratch) / "checkpoints"
    trains = train.action == "force" or store.check("train", train.plan.key)[0] is None
    # a forced train sets the folder's run aside and starts at step 0
    start = 0 if train.action == "force" else resume_point(run, train.section.train_iters) or 0
    missing = [p.plan.iteration for p in planned
               if p.stage.checkpoint_of and p.plan.label and p.action != "reuse"
               and store.check(p.plan.stage, p.plan.key)[0] is None
               and not checkpoint.iteration_dir(run, p.plan.iteration).is_dir()
               and not (trains and p.plan.iteration > start)]
    if missing:
        kept = ", ".join(map(str, checkpoint.available_iterations(run))) or "none"
        raise UserError(f"evaluate.checkpoints: the checkpoint of iteration "
                        f"{', '.join(map(str, missing))} is no longer kept in {run} (kept: {kept}); "
                        "choose kept iterations, or delete that folder and rerun with --force "
                        "train to retrain keeping them")


def _run_name() -> str:
    """`<preset>-<what differs from it>-<start time>`, e.g. `tiny-lr2e-5-iters20-20261202-101500`
    (`settings/naming.py`); artifact keys start with it (`tasks/stage.py:run_artifact_key`)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    try:
        label = run_label(resolve_settings(params.get("preset"), params.get("settings")))
    except UserError:  # the run fails at its start with that line
        label = Path(str(params.get("preset") or DEFAULT_PRESET)).stem
    return f"{label}-{flow_run.scheduled_start_time:%Y%m%d-%H%M%S}"


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
        f"{dump_settings(resolved)}```", key=run_artifact_key("sft-pipeline-settings"),
        description="The settings this run resolved (preset + override)")


def _run(settings: PipelineSettings, selection: Selection, verify: bool,
         log) -> dict[str, Manifest] | State:
    workdir = Path(settings.workdir).resolve()
    store = ArtifactStore(workdir)
    planned = plan_pipeline(settings, selection)
    manifests: dict[str, Manifest] = {}
    _reused(planned, store, verify, manifests)  # reused inputs must exist before anything runs
    check_checkpoints(planned, store)
    futures: dict[str, PrefectFuture] = {}
    _submit(planned, futures, manifests, settings, workdir, verify)
    later = set(resolve(selection)) - {p.stage.name for p in planned}
    if later and "tokenize" in futures:  # `train.epochs`: the step count needs the data
        log.info("train.epochs: planning %s once tokenize is built", ", ".join(sorted(later)))
        futures["tokenize"].wait()
        if futures["tokenize"].state.is_completed():
            rest = [p for p in plan_pipeline(settings, selection)
                    if p.name not in futures and p.name not in manifests]
            try:
                _reused(rest, store, verify, manifests)
                check_checkpoints(rest, store)
            except UserError:
                for future in futures.values():  # what runs finishes before the run fails
                    future.wait()
                raise
            planned += rest
            _submit(rest, futures, manifests, settings, workdir, verify)
    for future in futures.values():  # every branch runs to its end before the run fails
        future.wait()
    status = {name: "reused (not selected)" for name in manifests}
    failures = []
    stages = {p.name: p.stage for p in planned}
    for name, future in futures.items():
        state = future.state
        status[name] = state.name
        if state.is_completed():
            manifests[name] = future.result()
        elif state.is_failed():
            failures.append(_failure(name, stages[name], state, settings))
    _summary_artifact([p.name for p in planned], manifests, status)
    if failures:  # the failed stages' own lines, as the run's state
        return Failed(message="; ".join(failures))
    if settings.export.push.repo:
        for p in planned:
            if p.stage.name == "export" and p.name in manifests:
                _push(p, manifests, settings)
    return manifests


def _reused(planned: list[PlannedStage], store: ArtifactStore, verify: bool,
            manifests: dict[str, Manifest]) -> None:
    for p in planned:
        if p.action == "reuse":
            manifest, why = store.check(p.plan.stage, p.plan.key, verify=verify)
            if manifest is None:
                raise UserError(f"stage {p.name} is needed as input but its artifact {p.plan.key} is "
                                f"{why}; run it first (drop --only/--from) or `rsft run --until {p.name}`")
            manifests[p.name] = manifest


def _submit(planned: list[PlannedStage], futures: dict[str, PrefectFuture],
            manifests: dict[str, Manifest], settings: PipelineSettings, workdir: Path,
            verify: bool) -> None:
    for p in planned:  # DAG order: a stage's upstream futures exist when it is submitted
        if p.action == "reuse":
            continue
        task = stage_task.with_options(
            name=p.name, task_run_name=p.name,
            **(retry_options(settings.retries) if p.stage.network else {}))
        # Futures as inputs: Prefect waits for them, records the edge, and leaves the stage
        # `NotReady` if one failed.
        upstream = {u: futures.get(n) or manifests[n] for u, n in p.upstream.items()}
        futures[p.name] = task.submit(stage=p.stage, section=p.section, plan=p.plan,
                                      upstream=upstream, workdir=str(workdir),
                                      force=p.action == "force", verify=verify)


def _failure(name: str, stage: Stage, state, settings: PipelineSettings) -> str:
    """A failed stage's one line. A stage fails with its message for a user mistake; a network
    stage that gave up on transient errors says so; anything else is a bug: raised, traceback."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, BaseException):
        if stage.network and is_transient(error):
            return gave_up(name, error, settings.retries)
        raise error
    return state.message or f"{name}: failed"


@task(name="push", task_run_name="push", retry_condition_fn=retry_transient)
def push_task(export: Manifest, card: str, push: HubPushSettings) -> dict:
    return hub_push.push(export, card, push, get_run_logger())


def _push(export: PlannedStage, manifests: dict[str, Manifest], settings: PipelineSettings) -> None:
    """Upload one export, with its evaluated model card when its evaluation ran (idempotent).
    An intermediate checkpoint's export goes to its own branch: `<revision>-step<N>`, or
    `rsft-<its export key>` without `export.push.revision`."""
    suffix = export.name.removeprefix("export")  # "" or "@6"
    evaluation = manifests.get(f"evaluate{suffix}")
    card_file = (evaluation.dir / "model_card.md" if evaluation
                 else manifests[export.name].dir / "README.md")
    push = settings.export.push
    if suffix and push.revision:
        push = push.model_copy(update={"revision": f"{push.revision}-step{export.plan.iteration}"})
    state = push_task.with_options(task_run_name=f"push{suffix}", **retry_options(settings.retries))(
        manifests[export.name], card_file.read_text(), push, return_state=True)
    if state.is_failed():
        error = state.result(raise_on_failure=False)
        if isinstance(error, BaseException) and is_transient(error):
            raise UserError(gave_up("push", error, settings.retries)) from error
        raise error if isinstance(error, BaseException) else RuntimeError(state.message)
    result = state.result()
    key = "push-files" if not suffix else f"push-step{export.plan.iteration}-files"
    create_table_artifact([{"file": f} for f in result["files"]], key=run_artifact_key(key),
                          description=f"{'pushed' if result['pushed'] else 'not pushed'} to "
                                      f"{result['repo']}@{result['revision']}")


def _summary_artifact(names: list[str], manifests: dict[str, Manifest],
                      status: dict[str, str]) -> None:
    rows = ["| stage | state | key | size | path |", "|---|---|---|---|---|"]
    for name in (n for n in names if n in status):
        if m := manifests.get(name):
            rows.append(f"| {name} | {status[name]} | `{m.key}` | {m.size / 1e6:.1f} MB | `{m.path}` |")
        else:
            rows.append(f"| {name} | {status[name]} | - | - | - |")
    create_markdown_artifact("\n".join(rows), key=run_artifact_key("sft-pipeline-stages"),
                             description="Stage artifacts of this run")
