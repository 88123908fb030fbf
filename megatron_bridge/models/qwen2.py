"""Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen: the Llama decoder with QKV biases."""

from megatron_bridge.models.base import Architecture
from megatron_bridge.models.llama import DECODER, decoder_config

ARCH = Architecture(
    name="qwen2", hf_architectures=("Qwen2ForCausalLM",), params=DECODER,
    config=lambda hf: decoder_config(hf, qkv_bias=True),
)
