"""Build this rank's megatron-core GPTModel from an HF config.json, through the architecture tables.

The layer spec is Transformer Engine's when TE is importable and CUDA is present, megatron-core's
local spec otherwise; both save the same `torch_dist` checkpoint keys (the local spec maps its
norm names onto TE's fused ones).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from megatron_bridge.compat import cpu_only
from megatron_bridge.models import Geometry, architecture_for

VOCAB_DIVISOR = 128  # Megatron-LM's --make-vocab-size-divisible-by default
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    return json.loads((Path(hf_dir) / "config.json").read_text())


def hf_dtype(hf: dict[str, Any]) -> torch.dtype:
    return DTYPES.get(hf.get("torch_dtype") or hf.get("dtype") or "float32", torch.float32)


def padded_vocab_size(vocab: int, tp: int) -> int:
    multiple = VOCAB_DIVISOR * tp
    return math.ceil(vocab / multiple) * multiple


def check_layout(hf: dict[str, Any], tp: int, pp: int) -> None:
    """TP must divide heads and KV groups, PP the layers (ValueError naming the fix)."""
    heads = hf["num_attention_heads"]
    groups = hf.get("num_key_value_heads") or heads
    layers = hf["num_hidden_layers"]
    if heads % tp or groups % tp:
        divisors = [d for d in range(1, groups + 1) if groups % d == 0 and heads % d == 0]
        raise ValueError(f"tensor_parallel={tp} must divide the {heads} attention heads and {groups} "
                         f"KV groups; use one of {divisors}")
    if layers % pp:
        divisors = [d for d in range(1, layers + 1) if layers % d == 0]
        raise ValueError(f"pipeline_parallel={pp} must divide the {layers} layers; use one of "
                         f"{divisors}")


def geometry(hf: dict[str, Any], tp: int) -> Geometry:
    heads = hf["num_attention_heads"]
    return Geometry(
        num_heads=heads, num_query_groups=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, vocab_size=hf["vocab_size"],
        padded_vocab_size=padded_vocab_size(hf["vocab_size"], tp), tp=tp)


def use_te() -> bool:
    if cpu_only():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def build_model(hf: dict[str, Any], tp: int = 1, pp: int = 1, dtype: torch.dtype | None = None,
                initialize: bool = False, parallel_output: bool = True, **config_overrides):
    """This rank's GPTModel (model-parallel groups must be initialised). Weights are left
    uninitialised unless `initialize` (a converter overwrites them all anyway).
    `config_overrides` are extra TransformerConfig fields (training: recompute, loss options)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer import TransformerConfig

    check_layout(hf, tp, pp)
    kwargs = architecture_for(hf).config(hf)
    model_kwargs = kwargs.pop("model")
    dtype = dtype or hf_dtype(hf)
    cpu = cpu_only()
    config = TransformerConfig(
        **kwargs,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=cpu, perform_initialization=initialize,
        # Fused kernels are CUDA-only; on GPU TE provides its own.
        bias_activation_fusion=not cpu, bias_dropout_fusion=not cpu, masked_softmax_fusion=not cpu,
        apply_rope_fusion=False, persist_layer_norm=not cpu, gradient_accumulation_fusion=False,
        **config_overrides,
    )
    if use_te():
        spec = specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    else:
        spec = specs.get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm,
                                              normalization="RMSNorm")
    model_kwargs["vocab_size"] = padded_vocab_size(model_kwargs["vocab_size"], tp)
    model = GPTModel(config, spec, pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(), parallel_output=parallel_output,
                     **model_kwargs)
    return model.to(dtype)
