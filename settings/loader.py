"""Load settings: a preset name or YAML file, plus `a.b.c=value` overrides, validated in one go."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

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


def overrides_dict(assignments: list[str]) -> dict[str, Any]:
    """`--set a.b.c=value` assignments as the nested partial settings they stand for."""
    data: dict[str, Any] = {}
    for assignment in assignments:
        apply_override(data, assignment)
    return data


def merge(base: dict[str, Any], override: Mapping[str, Any],
          model: type[BaseModel] = PipelineSettings) -> dict[str, Any]:
    """Partial settings `override` onto `base` (a new dict), as `--set` applies them: a settings
    section merges key by key; any other value replaces the base's — a list, and a free-form
    mapping such as `train.kubernetes.node_selector`, too."""
    out = dict(base)
    for key, value in override.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        section = field.annotation if field is not None else None
        if (isinstance(section, type) and issubclass(section, BaseModel)
                and isinstance(value, Mapping) and isinstance(out.get(key), Mapping)):
            out[key] = merge(out[key], value, section)
        else:
            out[key] = value
    return out


def leaf_keys(override: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys a partial settings mapping sets (`{"train": {"lr": 1}}` → `train.lr`)."""
    keys = []
    for key, value in override.items():
        dotted = f"{prefix}{key}"
        keys += leaf_keys(value, f"{dotted}.") if isinstance(value, Mapping) and value else [dotted]
    return keys


def preset_reference(name_or_file: str | None) -> str:
    """What names these settings for another process (a flow run): a preset's name, or a settings
    file's absolute path."""
    path = resolve_config(name_or_file)
    return path.stem if path.parent == PRESETS_DIR else str(path.resolve())


def _overlaps(loc: str, key: str) -> bool:
    return loc == key or loc.startswith(f"{key}.") or key.startswith(f"{loc}.")


def format_validation_error(err: ValidationError, origin: str,
                            overridden: list[str] = (), label: str = "--set ") -> str:
    """One line per problem: where it comes from (`origin`, or `label` — `--set` — for a problem
    under one of the `overridden` dotted keys), field path, the value given, what is allowed; an
    unknown key another tool spells that way names ours."""
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
        where = (label if any(_overlaps(loc, k) for k in overridden) else f"{origin}: ")
        lines.append(f"{where}{loc}{given}: {msg}")
    return "\n".join(lines)


PARTIAL_LABEL = "settings parameter: "
"""How a problem in a flow run's partial `settings` override is named."""


def load_settings(name_or_file: str | None = None, overrides: list[str] | None = None,
                  partial: Mapping[str, Any] | None = None) -> PipelineSettings:
    """A preset or settings file, then `--set` `overrides`, or the `partial` settings mapping a
    flow run was given (merged as `merge` does)."""
    overrides = list(overrides or [])
    check_overrides(overrides, name_or_file)
    path = resolve_config(name_or_file)
    data = read_yaml(path)
    for assignment in overrides:
        apply_override(data, assignment)
    if partial is not None and not isinstance(partial, Mapping):
        raise UserError(f"{PARTIAL_LABEL}expected a mapping of settings to change, e.g. "
                        f'{{"train": {{"train_iters": 20}}}}, got {partial!r}')
    data = merge(data, partial or {})
    try:
        return PipelineSettings.model_validate(data)
    except ValidationError as err:
        # Name what the user wrote: their file, or the preset (not its file) they chose.
        origin = str(path) if path.parent != PRESETS_DIR else f"preset {path.stem}"
        if partial:
            raise UserError(format_validation_error(err, origin, leaf_keys(partial),
                                                    PARTIAL_LABEL)) from None
        keys = [a.partition("=")[0].strip() for a in overrides]
        raise UserError(format_validation_error(err, origin, keys)) from None


def dump_settings(settings: PipelineSettings) -> str:
    return yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
