"""A plain-text reference of every setting (`rsft settings show --docs`), from the models' own
field docstrings, so the documentation cannot drift from the code."""

from __future__ import annotations

from typing import get_args

from pydantic import BaseModel

from settings.models import PipelineSettings


def _type_name(annotation) -> str:
    if get_args(annotation) or not hasattr(annotation, "__name__"):
        return str(annotation).replace("typing.", "").replace("settings.models.", "")
    return annotation.__name__


def _walk(model: type[BaseModel], prefix: str = "") -> list[str]:
    lines = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"\n[{path}] {(annotation.__doc__ or '').strip()}")
            lines += _walk(annotation, f"{path}.")
            continue
        default = info.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = [d.model_dump() if isinstance(d, BaseModel) else d for d in default]
        doc = " ".join((info.description or "").split())
        lines.append(f"  {path} ({_type_name(annotation)}, default {default!r})\n      {doc}")
    return lines


def settings_reference() -> str:
    return "\n".join(_walk(PipelineSettings)).strip("\n") + "\n"
