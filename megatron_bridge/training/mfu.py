"""Model FLOPs utilisation: a step's model FLOPs over what the GPUs could do in that time.

The peak is the device's dense throughput for the run's precision — tensor cores for bf16/fp16,
plain FP32 for fp32 (megatron-core and torch leave TF32 off) — from the vendor's data sheets,
keyed by `torch.cuda.get_device_name()`. `RSFT_PEAK_TFLOPS` overrides it (per GPU); an unknown
device without it gets no MFU rather than a wrong one.
"""

from __future__ import annotations

import os
from typing import Any

# (name fragment, dense bf16/fp16 TFLOP/s, fp32 TFLOP/s); the first fragment found in the device
# name wins, so the more specific names come first ("GH200" holds "H200", "H100 PCIe" "H100").
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("GB200", 2500.0, 80.0),
    ("B200", 2250.0, 80.0),
    ("GH200", 989.4, 66.9),
    ("H200 NVL", 835.0, 60.0),
    ("H200", 989.4, 66.9),
    ("H100 PCIe", 756.0, 51.2),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.4, 66.9),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("H800", 989.4, 66.9),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
    ("L40S", 362.1, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),  # A10, A10G
)


def peak_flops(device_name: str | None, precision: str) -> float | None:
    """One GPU's dense FLOP/s for `precision` ("bf16", "fp16", "fp32"), or None if unknown."""
    if override := os.environ.get("RSFT_PEAK_TFLOPS"):
        return float(override) * 1e12
    for fragment, half, single in PEAK_TFLOPS:
        if device_name and fragment in device_name:
            return (single if precision == "fp32" else half) * 1e12
    return None


def model_flops(hf: dict[str, Any], lengths: list[list[int]]) -> float:
    """Training FLOPs of a step over rows of packed samples (Megatron's formula, forward +
    backward = 3× forward), attention counted over the real sample lengths (packed samples do
    not attend to each other; causal: half of each square)."""
    h, layers = hf["hidden_size"], hf["num_hidden_layers"]
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or h // heads
    ffn = hf["intermediate_size"]
    per_token = layers * (2 * h * head_dim * (heads + 2 * kv) + 2 * heads * head_dim * h
                          + 6 * h * ffn) + 2 * h * hf["vocab_size"]
    tokens = sum(n for row in lengths for n in row)
    attention = layers * 4 * heads * head_dim * sum(n * n for row in lengths for n in row) / 2
    return 3 * (per_token * tokens + attention)
