"""Load settings: a preset name or YAML file, plus `a.b.c=value` overrides, validated in one go."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from settings.aliases import did_you_mean
from settings.errors import UserError
from settings.models import PipelineSettings

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_PRESET = "tiny"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_config(name_or_file: str | None) -> Path:
    """A preset name (`tiny`) or a path to a YAML file → the YAML file to read."""
    name_or_file = name_or_file or DEFAULT_PRESET
    path = Path(name_or_file)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise UserError(f"settings file {path} does not exist")
        return path
    preset = PRESETS_DIR / f"{name_or_file}.yaml"
    if not preset.is_file():
        raise UserError(
            f"unknown preset '{name_or_file}'; presets: {', '.join(preset_names())} "
            "(or pass a path to a YAML file)"
        )
    return preset


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}{where}: invalid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings at the top level")
    return data


def check_overrides(overrides: list[str], name_or_file: str | None) -> None:
    """Every override is KEY=VALUE. `--set train.lr 2e-5` (a space for the `=`) leaves the value
    where the preset goes; say so, rather than that `2e-5` is an unknown preset."""
    for assignment in overrides:
        dotted, sep, _ = assignment.partition("=")
        if sep and dotted.strip():
            continue
        stray = name_or_file and not _resolvable(name_or_file)
        fix = f"write --set {assignment}={name_or_file}" if stray else "e.g. train.lr=1e-5"
        raise UserError(f"--set '{assignment}': expected KEY=VALUE ({fix})")


def _resolvable(name_or_file: str) -> bool:
    return Path(name_or_file).exists() or (PRESETS_DIR / f"{name_or_file}.yaml").is_file()


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.c=value` in place; the value is parsed as a YAML scalar/flow value."""
    check_overrides([assignment], None)
    dotted, _, raw = assignment.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = dotted.strip().split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {dotted}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def _overlaps(loc: str, key: str) -> bool:
    return loc == key or loc.startswith(f"{key}.") or key.startswith(f"{loc}.")


def format_validation_error(err: ValidationError, origin: str,
                            overridden: list[str] = ()) -> str:
    """One line per problem: where it comes from (`origin`, or `--set` for a problem under one
    of the `overridden` dotted keys), field path, the value given, what is allowed; an unknown
    key another tool spells that way names ours."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        given = "" if e["type"] == "missing" or isinstance(e.get("input"), dict) else (
            f" = {e.get('input')!r}")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            hint = did_you_mean(e["loc"])
            msg = "unknown setting" + (f"; {hint}" if hint else
                                       " (see `rsft settings show --docs` for the valid keys)")
        where = ("--set " if any(_overlaps(loc, k) for k in overridden) else f"{origin}: ")
        lines.append(f"{where}{loc}{given}: {msg}")
    return "\n".join(lines)


def load_settings(name_or_file: str | None = None, overrides: list[str] | None = None) -> PipelineSettings:
    overrides = list(overrides or [])
    check_overrides(overrides, name_or_file)
    path = resolve_config(name_or_file)
    data = read_yaml(path)
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return PipelineSettings.model_validate(data)
    except ValidationError as err:
        # Name what the user wrote: their file, or the preset (not its file) they chose.
        origin = str(path) if path.parent != PRESETS_DIR else f"preset {path.stem}"
        keys = [a.partition("=")[0].strip() for a in overrides]
        raise UserError(format_validation_error(err, origin, keys)) from None


def dump_settings(settings: PipelineSettings) -> str:
    return yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
