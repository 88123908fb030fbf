"""Architecture tables, one short module per family; `architecture_for` picks one from an HF config."""

from __future__ import annotations

from typing import Any

from megatron_bridge.models import llama, qwen2, qwen3
from megatron_bridge.models.base import (
    Architecture,
    Geometry,
    Kind,
    ParamMap,
    to_hf,
    to_megatron,
)
from settings.errors import UserError

ARCHITECTURES: tuple[Architecture, ...] = (qwen2.ARCH, llama.ARCH, qwen3.ARCH)



def architecture_for(hf_config: dict[str, Any]) -> Architecture:
    names = hf_config.get("architectures") or []
    for arch in ARCHITECTURES:
        if any(n in arch.hf_architectures for n in names):
            return arch
    supported = ", ".join(n for a in ARCHITECTURES for n in a.hf_architectures)
    raise UserError(f"architecture {names or '(none in config.json)'} is not "
                                  f"supported; supported: {supported}")


__all__ = ["ARCHITECTURES", "Architecture", "Geometry", "Kind", "ParamMap",
           "UserError", "architecture_for", "to_hf", "to_megatron"]
