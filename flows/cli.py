"""`rsft`: run the pipeline, inspect its stages and settings. User mistakes print one line and
exit 2; nothing is published for them."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from settings import UserError, dump_settings, load_settings, preset_names

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="reasoning-sft: Prefect + Megatron-core SFT pipeline for reasoning LLMs.")
settings_app = typer.Typer(no_args_is_help=True, help="Inspect settings.")
app.add_typer(settings_app, name="settings")
convert_app = typer.Typer(no_args_is_help=True, help="Convert checkpoints between HF and Megatron.")
app.add_typer(convert_app, name="convert")
kubernetes_app = typer.Typer(no_args_is_help=True, help="The Kubernetes launcher's PyTorchJob.")
app.add_typer(kubernetes_app, name="kubernetes")
err = Console(stderr=True)

ConfigArg = Annotated[Optional[str], typer.Argument(
    metavar="[PRESET|FILE]", help=f"A preset ({', '.join(preset_names())}) or a YAML file; "
    "default: tiny.", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", help="Override a setting, e.g. --set train.lr=1e-5 (repeatable).")]


class OneErrorLine(logging.Filter):
    """On the console of `rsft run`, a failed stage's message is printed once: as the run's last
    line (`error: …`). Prefect would also print it in its task-failure line (with a stray
    `NoneType: None`: it logs a returned Failed state with exc_info), in the task's final state
    and in the flow's. The Prefect UI keeps all of them (its API handler is not filtered)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith("Task run failed with state"):
            return False
        if text.startswith("Finished in state Failed("):
            # The API handler (on the run loggers) has sent the record already; the console
            # (on the root logger) is the last to see it.
            record.msg, record.args = "Finished in state Failed (its error is the last line)", ()
        return True


def quiet_repeated_errors() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
                isinstance(f, OneErrorLine) for f in handler.filters):
            handler.addFilter(OneErrorLine())


def fail(message: str, code: int = 2) -> None:
    for line in message.splitlines():
        err.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def run(
    config: ConfigArg = None,
    set_: SetOpt = None,
    from_stage: Annotated[Optional[str], typer.Option(
        "--from", help="Rerun this stage and everything downstream of it.")] = None,
    only: Annotated[Optional[list[str]], typer.Option(
        help="Run only this stage (repeatable); its inputs must already be built.")] = None,
    until: Annotated[Optional[str], typer.Option(help="Stop after this stage.")] = None,
    force: Annotated[Optional[list[str]], typer.Option(
        help="Rebuild this stage even if cached (repeatable, or 'all'); downstream stages "
        "rebuild only if its output changed.")] = None,
    verify: Annotated[bool, typer.Option(
        help="Check content hashes of reused artifacts (sizes are always checked).")] = False,
) -> None:
    """Run the pipeline (cached stages are skipped)."""
    try:
        settings = load_settings(config, set_)
        # Plan before starting Prefect, so a mistake costs no server start-up.
        from flows.pipeline import plan_pipeline
        from flows.selection import Selection

        selection = Selection(from_stage, list(only or []), until, list(force or []))
        planned = plan_pipeline(settings, selection)
    except UserError as e:
        fail(str(e))
    from flows import interrupt
    from flows.pipeline import sft_pipeline
    from flows.summary import built_artifacts, summary
    from settings.loader import overrides_dict, preset_reference

    quiet_repeated_errors()
    interrupt.install(settings, planned)  # Ctrl-C: everything stops, one line, exit 130
    # The flow run's parameters are what the user typed (the preset, the keys changed), as for
    # a deployment run; the flow resolves them to these same settings.
    state = sft_pipeline(preset=preset_reference(config), settings=overrides_dict(set_ or []),
                         from_stage=from_stage, only=only, until=until, force=force,
                         verify=verify, return_state=True)
    run_name = _flow_run_name(state)
    if state.is_failed():
        # A user mistake fails the flow with its one-line message (exit 2); anything else is a
        # bug whose traceback Prefect has already logged (exit 1).
        bug = isinstance(state.result(raise_on_failure=False), BaseException)
        try:  # what the run built and how to go on; never in the way of the error itself
            _echo_lines(summary(settings, selection, built_artifacts(settings, selection),
                                config, list(set_ or []), run_name, failed=True))
        except Exception as e:  # noqa: BLE001
            err.print(f"(no summary: {type(e).__name__}: {e})", highlight=False, soft_wrap=True)
        fail(state.message or "the pipeline failed (see the log above)", code=1 if bug else 2)
    manifests = state.result()
    table = Table(title=f"{settings.name}: artifacts")
    for col in ("stage", "key", "size"):
        table.add_column(col)
    table.add_column("path", overflow="fold")  # whole, whatever the terminal's width
    for name, m in manifests.items():
        table.add_row(name, m.key, f"{m.size / 1e6:.1f} MB", m.path)
    Console().print(table)
    _echo_lines(summary(settings, selection, manifests, config, list(set_ or []), run_name))


def _echo_lines(lines: list[str]) -> None:
    """Plain lines on stdout: never wrapped or cut (paths stay whole and copyable)."""
    typer.echo("\n" + "\n".join(lines))


def _flow_run_name(state) -> str | None:
    """The flow run's name (as the Prefect UI lists it), or None if the API cannot say."""
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.read_flow_run(state.state_details.flow_run_id).name
    except Exception:  # noqa: BLE001 - only a convenience in the summary
        return None


@app.command()
def stages(
    config: ConfigArg = None,
    set_: SetOpt = None,
    verify: Annotated[bool, typer.Option(help="Also check content hashes.")] = False,
) -> None:
    """Show each stage's artifact key, whether it is built (cached), its size and path."""
    from flows.pipeline import plan_pipeline, status_table
    from flows.selection import Selection

    try:
        settings = load_settings(config, set_)
        planned = plan_pipeline(settings, Selection())
        rows = status_table(settings, planned, verify=verify)
    except UserError as e:
        fail(str(e))
    table = Table(title=f"{settings.name}: stages under {settings.workdir}")
    for col in rows[0]:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row.values())
    Console().print(table)
    if not any(p.name == "train" for p in planned):
        typer.echo(f"train and later stages: their keys follow from train.epochs "
                   f"({settings.train.epochs:g}) once tokenize is built (rsft run --until tokenize)")


@settings_app.command("show")
def settings_show(
    config: ConfigArg = None,
    set_: SetOpt = None,
    docs: Annotated[bool, typer.Option(
        help="List every setting with its description, default and the chosen value.")] = False,
) -> None:
    """Print the resolved settings as YAML (or, with --docs, what each setting means and its
    value in the chosen preset or file)."""
    try:
        settings = load_settings(config, set_)
    except UserError as e:
        fail(str(e))
    if docs:
        from settings.docs import settings_reference

        typer.echo(settings_reference(settings))
    else:
        typer.echo(dump_settings(settings), nl=False)


@settings_app.command("import-open-r1")
def settings_import_open_r1(
    recipe: Annotated[Path, typer.Argument(
        help="An open-r1 SFT recipe (recipes/<model>/sft/config_*.yaml).", show_default=False)],
    out: Annotated[Optional[Path], typer.Option(
        help="Settings file to write (default: <recipe name>.rsft.yaml here); the recipe's chat "
        "template goes beside it.")] = None,
    gpus: Annotated[int, typer.Option(
        min=1, help="GPUs the recipe ran on (open-r1 uses 8): the global batch size is "
        "per-device batch × accumulation × GPUs.")] = 1,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Turn an open-r1 SFT recipe into our settings YAML; prints each key it did not map, and
    why."""
    import yaml
    from pydantic import ValidationError

    from settings.loader import format_validation_error, read_yaml
    from settings.models import PipelineSettings
    from settings.open_r1 import import_recipe

    out = out or Path(f"{recipe.stem}.rsft.yaml")
    try:
        if not recipe.is_file():
            raise UserError(f"{recipe} does not exist")
        if out.exists() and not overwrite:
            raise UserError(f"--out {out} exists; choose another or pass --overwrite")
        template = out.with_name(f"{out.stem}.chat_template.jinja")
        try:
            imported = import_recipe(read_yaml(recipe), recipe.stem, gpus, str(template))
        except (KeyError, TypeError, ValueError) as e:  # a value of the wrong shape
            raise UserError(f"{recipe}: not readable as an open-r1 SFT recipe "
                            f"({type(e).__name__}: {e})") from None
        try:
            PipelineSettings.model_validate(imported.settings)
        except ValidationError as e:
            raise UserError(format_validation_error(e, f"imported from {recipe}")) from None
    except UserError as e:
        fail(str(e))
    if imported.chat_template is not None:
        template.write_text(imported.chat_template)
    header = [f"# Imported from {recipe} by `rsft settings import-open-r1`."]
    header += [f"# not mapped: {key}: {why}" for key, why in imported.not_mapped]
    out.write_text("\n".join(header) + "\n" + yaml.safe_dump(
        imported.settings, sort_keys=False, allow_unicode=True))
    for key, why in imported.not_mapped:
        typer.echo(f"not mapped: {key}: {why}")
    for key, how in imported.notes:
        typer.echo(f"note: {key}: {how}")
    typer.echo(f"wrote {out}" + (f" and {template}" if imported.chat_template is not None else ""))


@kubernetes_app.command("manifest")
def kubernetes_manifest(
    config: ConfigArg = None,
    set_: SetOpt = None,
    workdir: Annotated[Optional[Path], typer.Option(
        help="The workdir's absolute path in the pods (default: the settings' workdir, "
        "resolved here).")] = None,
    key: Annotated[str, typer.Option(
        help="The train stage's key (names the job).")] = "0123456789abcdef",
) -> None:
    """Print the PyTorchJob the train stage would create with launcher kubernetes (no cluster
    needed)."""
    from tasks.kubernetes.manifest import manifest_yaml, pytorchjob_manifest
    from tasks.train import resolve_device

    try:
        settings = load_settings(config, [*(set_ or []), "train.launcher=kubernetes"])
        root = (workdir or Path(settings.workdir)).absolute()
        job_path = root / "scratch" / "train" / key / "job.json"
        manifest = pytorchjob_manifest(settings.train, job_path, root, f"rsft-{key}",
                                       resolve_device(settings.train))
    except UserError as e:
        fail(str(e))
    typer.echo(manifest_yaml(manifest), nl=False)


def _bridge(args: list[str], layout: tuple[int, int] | None = None) -> str:
    """Run megatron_bridge (torchrun when TP×PP > 1); a user mistake exits 2 with its line."""
    from megatron_bridge.launch import run_bridge

    try:
        return run_bridge(args, layout)
    except UserError as e:
        fail(str(e))
    except RuntimeError as e:
        fail(str(e), code=1)


TpOpt = Annotated[int, typer.Option("--tp", min=1, help="Tensor-parallel size.")]
PpOpt = Annotated[int, typer.Option("--pp", min=1, help="Pipeline-parallel size.")]


@convert_app.command("hf2mcore")
def hf2mcore(
    hf: Annotated[Path, typer.Option(help="HF model folder (safetensors + config.json).")],
    out: Annotated[Path, typer.Option(help="Megatron checkpoint folder to write.")],
    tp: TpOpt = 1,
    pp: PpOpt = 1,
    dtype: Annotated[str, typer.Option(help="source, float32, bfloat16 or float16.")] = "source",
) -> None:
    """HF → Megatron torch_dist checkpoint at TP×PP (runs under torchrun when TP×PP > 1)."""
    _bridge(["hf2mcore", "--hf", str(hf), "--out", str(out), "--dtype", dtype], (tp, pp))
    typer.echo(f"wrote {out}")


@convert_app.command("mcore2hf")
def mcore2hf(
    mcore: Annotated[Path, typer.Option(help="Megatron checkpoint folder (any TP/PP).")],
    out: Annotated[Path, typer.Option(help="HF folder to write.")],
    hf_base: Annotated[Optional[Path], typer.Option(
        help="HF folder of the source model: its tokenizer files are copied.")] = None,
    max_shard_size: Annotated[str, typer.Option(
        help="Largest safetensors file (e.g. 5GB, 500MB); bigger models get an index.")] = "5GB",
    iteration: Annotated[Optional[int], typer.Option(
        help="Iteration to export (default: the latest).")] = None,
) -> None:
    """Megatron checkpoint (any TP/PP) → HF folder with safetensors and config.json."""
    _bridge(["mcore2hf", "--mcore", str(mcore), "--out", str(out), "--max-shard-size",
             max_shard_size] + (["--hf-base", str(hf_base)] if hf_base else [])
            + (["--iteration", str(iteration)] if iteration else []))
    typer.echo(f"wrote {out}")


@app.command("tokenize")
def tokenize_cmd(
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer folder with a chat template (the "
                                            "patch_tokenizer artifact, or any HF folder).")],
    data: Annotated[str, typer.Option(help="JSON/JSONL/Parquet file or folder (or hf://…).")],
    out: Annotated[Path, typer.Option(help="Folder to write the indexed datasets into.")],
    seq_len: Annotated[int, typer.Option(help="Tokens per training row.")] = 16384,
    pack: Annotated[bool, typer.Option(help="Pack samples (best-fit decreasing).")] = True,
    field: Annotated[Optional[list[str]], typer.Option(
        help="COLUMN=ROLE field map, repeatable (e.g. problem=user).")] = None,
    overlong: Annotated[str, typer.Option(help="drop, truncate or error.")] = "drop",
    workers: Annotated[int, typer.Option(help="Processes (0 = one per core).")] = 0,
) -> None:
    """Run the tokenize stage alone: data → `train-tokens/-mask` indexed datasets + stats."""
    import logging

    from pydantic import ValidationError

    from settings.loader import format_validation_error
    from settings.models import TokenizeSettings
    from tasks.tokenize import tokenize_files

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        fields = dict(f.split("=", 1) for f in field or [])
        settings = TokenizeSettings(seq_length=seq_len, pack=pack, overlong=overlong,
                                    workers=workers)
        stats = tokenize_files(data, fields, tokenizer, out, settings, logging.getLogger("rsft"))
    except ValidationError as e:
        fail(format_validation_error(e, "rsft tokenize"))
    except ValueError as e:  # a --field without "="
        fail(f"--field expects COLUMN=ROLE ({e})")
    except UserError as e:
        fail(str(e))
    train = stats["splits"]["train"]
    typer.echo(f"wrote {out}: {train['samples_out']} samples in {train['rows']} rows, "
               f"{100 * train['packing_efficiency']:.1f}% packed")


@app.command("eval")
def eval_cmd(
    model: Annotated[Path, typer.Option(help="HF model folder (with tokenizer and chat template), "
                                        "e.g. the export artifact.")],
    out: Annotated[Path, typer.Option(help="Folder to write results, details and logs into.")],
    task: Annotated[Optional[list[str]], typer.Option(
        "--tasks", help="TASK or TASK=SAMPLES, repeatable (default: the preset's tasks).")] = None,
    preset: Annotated[str, typer.Option(help="Preset or YAML file for the evaluate settings.")] = "tiny",
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE", help="Override a setting, as for `rsft run`, e.g. --set "
        "evaluate.max_new_tokens=256 (repeatable).")] = None,
) -> None:
    """Run the evaluate stage alone: lighteval on an HF folder → scores and hybrid metrics."""
    from pydantic import ValidationError

    from settings.loader import format_validation_error, load_settings
    from settings.models import EvalTask
    from tasks.evaluate import evaluate_model, hybrid_rows, score_rows

    try:
        settings = load_settings(preset, set_).evaluate
        if task:
            try:
                settings.tasks = [EvalTask(name=n, samples=k or 1)
                                  for n, _, k in (t.partition("=") for t in task)]
            except ValidationError as e:
                raise UserError(format_validation_error(e, "--tasks")) from None
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--out {out} is not empty; choose another folder")
        results = evaluate_model(settings, model, out)
    except UserError as e:
        fail(str(e))
    for row in score_rows(results, None):
        typer.echo(f"{row['task']:<24} {row['metric']:<28} {row['value']:.4f}")
    for row in hybrid_rows(results):
        typer.echo(f"{row['task']:<24} mode {row['mode']:<6} {row['share']:.2f} of samples, "
                   f"{row['mean_tokens']:.1f} tokens, accuracy {row['accuracy']:.3f}")
    typer.echo(f"wrote {out}")


@app.command("deploy")
def deploy_cmd(
    name: Annotated[Optional[list[str]], typer.Option(
        help="Only this deployment, as FLOW/DEPLOYMENT (repeatable); default: all.")] = None,
    gpus: Annotated[int, typer.Option(
        help="Slots of the `gpu` concurrency limit if it does not exist yet (GPUs per host).")] = 8,
    notify: Annotated[Optional[str], typer.Option(
        help="Notification block (`type-slug/name`) for the automations of "
             "deployments/automations.yaml: failed, crashed and stuck runs.")] = None,
) -> None:
    """Apply deployments/prefect.yaml to the Prefect API (work pools, `gpu` limit, deployments,
    and with --notify the failure automations)."""
    from flows.deploy import deploy

    try:
        typer.echo(deploy(gpus, name, notify=notify))
    except UserError as e:
        fail(str(e))


@app.command("verify")
def verify_cmd(
    hf: Annotated[Path, typer.Option(help="HF model folder (with its tokenizer).")],
    mcore: Annotated[Path, typer.Option(help="Megatron checkpoint folder.")],
    tp: TpOpt = 1,
    pp: PpOpt = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Compare a Megatron checkpoint's logits with transformers' on real-tokenizer prompts."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report_file = Path(tmp) / "verification.json"
        _bridge(["verify", "--hf", str(hf), "--mcore", str(mcore), "--json", str(report_file)],
                (tp, pp))
        report = json.loads(report_file.read_text())
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(title=f"{mcore} vs {hf} (TP={tp}, PP={pp})")
    for col in ("prompt", "tokens", "max |Δ|", "mean |Δ|", "top-1"):
        table.add_column(col)
    for r in report["prompts"]:
        table.add_row(r["prompt"], str(r["tokens"]), f"{r['max_abs_diff']:.3g}",
                      f"{r['mean_abs_diff']:.3g}", f"{r['top1_agreement']:.3f}")
    Console().print(table)


def main() -> None:
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral API's first start migrates its database: slow on a 2-core box.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
