"""Build this rank's megatron-core GPTModel from an HF config.json, through the architecture tables.

The layer spec and fused kernels are `megatron_bridge.host`'s decision (Transformer Engine's spec
where TE imports on a CUDA host, megatron-core's local spec otherwise); both specs save the same
`torch_dist` checkpoint keys (the local spec maps its norm names onto TE's fused ones).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from megatron_bridge.compat import cpu_only
from megatron_bridge.host import Host, Kernels, decide
from megatron_bridge.models import Architecture, Geometry, Kind, architecture_for
from settings.errors import UserError

# Transformer Engine fuses the pre-attention / pre-MLP norms into the next linear layer.
TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

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
        raise UserError(f"tensor_parallel={tp} must divide the {heads} attention heads and {groups} "
                         f"KV groups; use one of {divisors}")
    if layers % pp:
        divisors = [d for d in range(1, layers + 1) if layers % d == 0]
        raise UserError(f"pipeline_parallel={pp} must divide the {layers} layers; use one of "
                         f"{divisors}")


def geometry(hf: dict[str, Any], tp: int) -> Geometry:
    heads = hf["num_attention_heads"]
    return Geometry(
        num_heads=heads, num_query_groups=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, vocab_size=hf["vocab_size"],
        padded_vocab_size=padded_vocab_size(hf["vocab_size"], tp), tp=tp)


def model_kernels(hf: dict[str, Any], **options) -> Kernels:
    """This host's kernels for the model of `hf` (`options`: `decide`'s keywords)."""
    kwargs = architecture_for(hf).config(hf)
    kwargs.pop("model")
    return decide(Host.probe(), kwargs, **options)


def build_model(hf: dict[str, Any], tp: int = 1, pp: int = 1, dtype: torch.dtype | None = None,
                initialize: bool = False, parallel_output: bool = True,
                kernels: Kernels | None = None, **config_overrides):
    """This rank's GPTModel (model-parallel groups must be initialised). Weights are left
    uninitialised unless `initialize` (a converter overwrites them all anyway). `kernels`: the
    spec and fused kernels (default: this host's, for inference); `config_overrides` are extra
    TransformerConfig fields (training: recompute, loss options). Parameters are created on
    this rank's CUDA device when there is one, else on the CPU."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer import TransformerConfig

    check_layout(hf, tp, pp)
    kwargs = architecture_for(hf).config(hf)
    model_kwargs = kwargs.pop("model")
    dtype = dtype or hf_dtype(hf)
    kernels = kernels or decide(Host.probe(), kwargs)
    settings = {
        **kwargs,
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        "params_dtype": dtype, "pipeline_dtype": dtype,
        "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16,
        "use_cpu_initialization": cpu_only(), "perform_initialization": initialize,
        **kernels.config(),
        **config_overrides,
    }
    config = TransformerConfig(**settings)
    if kernels.transformer_engine:
        spec = specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    else:
        spec = specs.get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm,
                                              normalization=config.normalization)
    model_kwargs["vocab_size"] = padded_vocab_size(model_kwargs["vocab_size"], tp)
    model = GPTModel(config, spec, pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(), parallel_output=parallel_output,
                     **model_kwargs)
    mark_tensor_parallel(model, hf)
    return model.to(dtype)


def param_rows(model, arch: Architecture, tied: bool):
    """(parameter, table row, HF names) for every parameter of the model."""
    table = {p.megatron: p for p in arch.params}
    layers = model.decoder.layers if hasattr(model, "decoder") else []
    for name, param in model.named_parameters():
        layer = None
        template = name
        if m := _LAYER.match(name):
            local, rest = int(m[1]), m[2]
            layer = layers[local].layer_number - 1  # global index under pipeline parallelism
            template = f"decoder.layers.{{L}}.{TE_ALIASES.get(rest, rest)}"
        row = table.get(template)
        if row is None:
            raise UserError(f"megatron parameter {name} has no mapping in the {arch.name} "
                                  "table (megatron_bridge/models)")
        hf_names = tuple(n.format(L=layer) for n in row.hf)
        if tied and template == "output_layer.weight":
            hf_names = ("model.embed_tokens.weight",)
        yield param, row, hf_names


def mark_tensor_parallel(model, hf: dict[str, Any]) -> None:
    """Set megatron's `tensor_model_parallel`/`partition_dim` attributes on every sharded
    parameter, from the architecture table. Megatron sets them while initialising weights, which
    a converted model skips; gradient-norm clipping relies on them to count shards once."""
    from megatron.core.tensor_parallel.layers import (
        set_tensor_model_parallel_attributes,
    )

    dims = {Kind.COLUMN: 0, Kind.QKV: 0, Kind.GATED_MLP: 0, Kind.VOCAB: 0, Kind.ROW: 1}
    tied = bool(hf.get("tie_word_embeddings", False))
    for param, row, _ in param_rows(model, architecture_for(hf), tied):
        if row.kind in dims and not hasattr(param, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(param, True, dims[row.kind], 1)
