"""Qwen3: the Llama decoder with per-head RMSNorm on queries and keys, no QKV bias."""

from megatron_bridge.models.base import Architecture, Kind, ParamMap
from megatron_bridge.models.llama import DECODER, decoder_config

_L, _M = "model.layers.{L}.self_attn", "decoder.layers.{L}.self_attention"

ARCH = Architecture(
    name="qwen3", hf_architectures=("Qwen3ForCausalLM",),
    params=DECODER + (
        ParamMap(f"{_M}.q_layernorm.weight", (f"{_L}.q_norm.weight",), Kind.REPLICATED),
        ParamMap(f"{_M}.k_layernorm.weight", (f"{_L}.k_norm.weight",), Kind.REPLICATED),
    ),
    config=lambda hf: decoder_config(hf, qkv_bias=bool(hf.get("attention_bias", False)),
                                     qk_layernorm=True),
)
