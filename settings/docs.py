"""A plain-text reference of every setting (`rsft settings show --docs`), from the models' own
field docstrings, so the documentation cannot drift from the code. Given the chosen settings (a
preset or file, with overrides), it shows their value beside each default."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel

from settings.models import PipelineSettings


def _type_name(annotation) -> str:
    if get_args(annotation) or not hasattr(annotation, "__name__"):
        return str(annotation).replace("typing.", "").replace("settings.models.", "")
    return annotation.__name__


def _plain(value: Any) -> Any:
    """A value as YAML would show it (models as mappings, paths as strings)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _walk(model: type[BaseModel], chosen: BaseModel | None, label: str,
          prefix: str = "") -> list[str]:
    lines = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = info.annotation
        value = getattr(chosen, name) if chosen is not None else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"\n[{path}] {(annotation.__doc__ or '').strip()}")
            lines += _walk(annotation, value, label, f"{path}.")
            continue
        default = _plain(info.get_default(call_default_factory=True))
        shown = f"default {default!r}"
        if chosen is not None and _plain(value) != default:
            shown = f"{label}: {_plain(value)!r}; {shown}"
        doc = " ".join((info.description or "").split())
        lines.append(f"  {path} ({_type_name(annotation)}, {shown})\n      {doc}")
    return lines


def settings_reference(settings: PipelineSettings | None = None) -> str:
    """Every setting with its meaning and default; with `settings`, also their value wherever it
    differs from the default (labelled with their name)."""
    label = settings.name if settings is not None else ""
    return "\n".join(_walk(PipelineSettings, settings, label)).strip("\n") + "\n"
