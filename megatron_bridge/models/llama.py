"""Llama (3.x): the decoder table Qwen2 and Qwen3 share. No biases, untied or tied embeddings,
Llama 3.1-style RoPE scaling."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from megatron_bridge.models.base import Architecture, Kind, ParamMap
from settings.errors import UserError

_L = "model.layers.{L}"
_M = "decoder.layers.{L}"

DECODER = (
    ParamMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Kind.VOCAB),
    ParamMap(f"{_M}.input_layernorm.weight", (f"{_L}.input_layernorm.weight",), Kind.REPLICATED),
    ParamMap(f"{_M}.self_attention.linear_qkv.weight", tuple(
        f"{_L}.self_attn.{p}_proj.weight" for p in "qkv"), Kind.QKV),
    ParamMap(f"{_M}.self_attention.linear_qkv.bias", tuple(
        f"{_L}.self_attn.{p}_proj.bias" for p in "qkv"), Kind.QKV),
    ParamMap(f"{_M}.self_attention.linear_proj.weight", (f"{_L}.self_attn.o_proj.weight",), Kind.ROW),
    ParamMap(f"{_M}.pre_mlp_layernorm.weight", (f"{_L}.post_attention_layernorm.weight",),
             Kind.REPLICATED),
    ParamMap(f"{_M}.mlp.linear_fc1.weight", (f"{_L}.mlp.gate_proj.weight", f"{_L}.mlp.up_proj.weight"),
             Kind.GATED_MLP),
    ParamMap(f"{_M}.mlp.linear_fc2.weight", (f"{_L}.mlp.down_proj.weight",), Kind.ROW),
    ParamMap("decoder.final_layernorm.weight", ("model.norm.weight",), Kind.REPLICATED),
    ParamMap("output_layer.weight", ("lm_head.weight",), Kind.VOCAB),
)


def rope_theta(hf: dict[str, Any]) -> float:
    return float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))


# megatron-core implements Llama 3.1's frequency scaling with these constants fixed (only the
# factor is a parameter); every Llama 3.1/3.2/3.3 checkpoint uses them.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def rope_scaling(hf: dict[str, Any]) -> dict[str, Any]:
    """GPTModel kwargs for the config's RoPE scaling; a clear error for kinds megatron-core lacks."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return {}
    if kind == "llama3" and all(float(scaling.get(k, -1)) == v for k, v in LLAMA3_FIXED.items()):
        return {"rope_scaling": True, "rope_scaling_factor": float(scaling["factor"])}
    detail = "" if kind != "llama3" else f" with {({k: scaling.get(k) for k in LLAMA3_FIXED})}"
    raise UserError(f"rope scaling '{kind}'{detail} is not supported by megatron-core; supported: "
                     f"none, or 'llama3' with {LLAMA3_FIXED}")


def decoder_config(hf: dict[str, Any], *, qkv_bias: bool, qk_layernorm: bool = False) -> dict[str, Any]:
    """The TransformerConfig + GPTModel kwargs every Llama-style decoder shares."""
    if hf.get("mlp_bias"):
        raise UserError("mlp_bias=true is not supported (no Llama/Qwen checkpoint uses it)")
    if hf.get("use_sliding_window"):
        raise UserError("sliding-window attention is not supported; set use_sliding_window=false")
    heads = hf["num_attention_heads"]
    return {
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "kv_channels": hf.get("head_dim") or hf["hidden_size"] // heads,
        "normalization": "RMSNorm",
        "layernorm_epsilon": hf.get("rms_norm_eps", 1e-6),
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "add_qkv_bias": qkv_bias,
        "qk_layernorm": qk_layernorm,
        "attention_dropout": float(hf.get("attention_dropout", 0.0)),
        "hidden_dropout": 0.0,
        "model": {
            "vocab_size": hf["vocab_size"],
            "max_sequence_length": hf.get("max_position_embeddings", 4096),
            "position_embedding_type": "rope",
            "rotary_base": rope_theta(hf),
            **rope_scaling(hf),
            "share_embeddings_and_output_weights": bool(hf.get("tie_word_embeddings", False)),
        },
    }


ARCH = Architecture(
    name="llama", hf_architectures=("LlamaForCausalLM",), params=DECODER,
    config=lambda hf: decoder_config(hf, qkv_bias=bool(hf.get("attention_bias", False))),
)
