"""What this host can run, and every kernel and layer-spec choice that follows from it, in one place.

`Host.probe()` imports what each choice needs — CUDA, Transformer Engine, TE's fused RoPE, Triton
(torch.compile's GPU code generator), the Apex / Megatron-LM CUDA extensions — and `decide()`
turns those facts, the architecture and the `train.kernels` settings into `Kernels`: the
TransformerConfig flags and the layer spec. A flag is on only when the kernel it needs imports:
"is there a GPU" is one probe among the others, never a stand-in for them (a GPU without TE or
Apex has none of their kernels). Forcing a flag on (`train.kernels.<flag>: on`) where its kernel
is absent is a `UserError` naming the kernel, raised before any model is built.

Which decisions only a GPU exercises: the Transformer Engine spec with THD packed attention,
`apply_rope_fusion` (TE), `masked_softmax_fusion`, `persist_layer_norm` and
`gradient_accumulation_fusion` (Apex / Megatron-LM CUDA extensions) run CUDA kernels; on the CPU
the tests check only their decisions. The compiled fusions (`bias_activation_fusion`,
`bias_dropout_fusion`: megatron-core's `jit_fuser`, i.e. torch.compile) build and step on the CPU
too, so the tests train with a GPU host's configuration there.
"""

from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass, fields
from functools import cache
from typing import Any

import torch.nn.functional as F

from settings.errors import UserError
from settings.models import KernelSettings

SOFTMAX_KERNELS = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda",
                   "scaled_softmax_cuda")
"""megatron-core's fused softmax (fusions/fused_softmax.py) imports these Megatron-LM / Apex CUDA
extensions when a bf16/fp16 attention row is 17–4096 tokens; no megatron-core wheel ships them."""
GRAD_ACCUMULATION_KERNEL = "fused_weight_gradient_mlp_cuda"
"""Apex's extension for weight-gradient GEMMs accumulating into DDP's `main_grad`: megatron's own
linear layers need it (its output layer even under Transformer Engine); NGC containers have it,
`pip install` does not."""
PERSIST_LAYER_NORM_KERNEL = "apex.contrib.layer_norm.layer_norm"
"""Apex's persistent LayerNorm (FastLayerNormFN), behind megatron's FusedLayerNorm."""
COMPILER = "torch.compile's code generator (Triton on CUDA, a C++ compiler on the CPU)"


def _imports(module: str, attribute: str | None = None) -> bool:
    """Whether `module` (and its `attribute`, when given, not None) imports here. Any exception
    counts as absent: a CUDA extension built for another torch raises OSError or RuntimeError."""
    try:
        loaded = importlib.import_module(module)
        return attribute is None or getattr(loaded, attribute, None) is not None
    except Exception:
        return False


@dataclass(frozen=True)
class Host:
    """What this host has, as far as kernel choices go (probed once per process)."""

    cuda: bool
    """A CUDA device is visible to torch."""
    transformer_engine: bool
    """`transformer_engine.pytorch` imports (its layers, THD attention)."""
    te_fused_rope: bool
    """megatron-core found Transformer Engine's fused RoPE (TE ≥ 1.4)."""
    compiler: bool
    """torch.compile can generate kernels here: Triton on CUDA, a C++ compiler on the CPU."""
    softmax_kernels: bool
    """All of `SOFTMAX_KERNELS` import."""
    grad_accumulation_kernel: bool
    """`GRAD_ACCUMULATION_KERNEL` imports."""
    persist_layer_norm_kernel: bool
    """`PERSIST_LAYER_NORM_KERNEL` imports."""
    device_name: str | None = None
    """`torch.cuda.get_device_name()` (the MFU peak table is keyed by it); None without CUDA."""

    @classmethod
    @cache
    def probe(cls) -> "Host":
        import torch

        cuda = torch.cuda.is_available()
        te = _imports("transformer_engine.pytorch")
        return cls(
            cuda=cuda, transformer_engine=te,
            te_fused_rope=te and _imports("megatron.core.models.common.embeddings.rope_utils",
                                          "fused_apply_rotary_pos_emb"),
            compiler=_imports("triton") if cuda else any(
                shutil.which(c) for c in ("g++", "c++", "clang++")),
            softmax_kernels=all(_imports(m) for m in SOFTMAX_KERNELS),
            grad_accumulation_kernel=_imports(GRAD_ACCUMULATION_KERNEL),
            persist_layer_norm_kernel=_imports(PERSIST_LAYER_NORM_KERNEL, "FastLayerNormFN"),
            device_name=torch.cuda.get_device_name() if cuda else None)


@dataclass(frozen=True)
class Kernels:
    """The layer spec and fused-kernel flags a model is built with, and why each is so."""

    transformer_engine: bool
    """Transformer Engine's layer spec; packed rows go in as THD sequences (else megatron-core's
    local spec with a block-diagonal attention mask)."""
    persist_layer_norm: bool
    masked_softmax_fusion: bool
    bias_activation_fusion: bool
    bias_dropout_fusion: bool
    apply_rope_fusion: bool
    gradient_accumulation_fusion: bool
    why: dict[str, str]
    """Flag → the reason it is off (or forced), for the flags that are off or forced."""

    def config(self) -> dict[str, bool]:
        """The TransformerConfig fields."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("transformer_engine", "why")}

    def summary(self) -> str:
        """One line for logs: the spec and the fused kernels in use."""
        on = [name for name, value in self.config().items() if value]
        spec = ("Transformer Engine spec, THD packed attention" if self.transformer_engine
                else "local spec, block-diagonal attention mask")
        return f"{spec}; fused: {', '.join(on) or 'none'}"


@dataclass(frozen=True)
class _Rule:
    blocked: str
    """Why the flag cannot be on here (empty: it can)."""
    auto_off: str = ""
    """Why `auto` leaves it off although it can be on (empty: `auto` turns it on)."""


def _rules(host: Host, arch: dict[str, Any], te: bool, training: bool,
           document_mask: bool) -> dict[str, _Rule]:
    def first(*reasons: tuple[bool, str]) -> str:
        return next((why for blocked, why in reasons if blocked), "")

    absent = ", absent here"
    # megatron-core's jit_fuser is torch.compile: on the CPU it compiles C++ in every process
    # (about 30 s for the SwiGLU fusion on 2 cores), more than a CPU run gains.
    compile_cost = "" if host.cuda else "auto: compiling on the CPU costs more than it saves"
    no_compiler = (not host.compiler, f"it needs {COMPILER}{absent}")
    return {
        "persist_layer_norm": _Rule(first(
            (te, "Transformer Engine's norms have their own kernels"),
            (arch.get("normalization") == "RMSNorm",
             "the model's RMSNorm runs as torch.nn.RMSNorm, which has no persistent kernel"),
            (not (host.cuda and host.persist_layer_norm_kernel),
             f"it needs Apex's persistent LayerNorm ({PERSIST_LAYER_NORM_KERNEL}) on a CUDA "
             f"host{absent}"))),
        "masked_softmax_fusion": _Rule(first(
            (te, "Transformer Engine's attention has its own softmax kernels"),
            (not (host.cuda and host.softmax_kernels),
             f"it needs the CUDA extensions {', '.join(SOFTMAX_KERNELS)} (Apex / Megatron-LM; no "
             f"megatron-core wheel ships them){absent}"),
            (document_mask, "packed rows need their block-diagonal mask, which the fused causal "
             "softmax ignores (it builds its own triangle: samples would attend across "
             "boundaries)"))),
        "bias_activation_fusion": _Rule(first(
            (arch.get("activation_func") not in (F.silu, F.gelu),
             "it fuses only gelu and silu (SwiGLU/GeGLU) activations"),
            no_compiler), auto_off=compile_cost),
        "bias_dropout_fusion": _Rule(first(no_compiler), auto_off=compile_cost),
        "apply_rope_fusion": _Rule(first(
            (not (host.cuda and host.te_fused_rope),
             f"it needs Transformer Engine's fused RoPE (TE ≥ 1.4) on a CUDA host{absent}"))),
        "gradient_accumulation_fusion": _Rule(first(
            (not training, "it applies to training only"),
            (not (host.cuda and host.grad_accumulation_kernel),
             f"it needs Apex's CUDA extension {GRAD_ACCUMULATION_KERNEL} on a CUDA host"
             f"{absent}"))),
    }


def _choose(name: str, forced: str, rule: _Rule) -> tuple[bool, str]:
    """(on?, why — empty when `auto` turned it on)."""
    if forced == "on" and rule.blocked:
        raise UserError(f"train.kernels.{name} is on, but {rule.blocked}; set "
                        f"train.kernels.{name}: auto")
    if forced != "auto":
        return forced == "on", f"train.kernels.{name}: {forced}"
    if rule.blocked:
        return False, rule.blocked
    return not rule.auto_off, rule.auto_off


def decide(host: Host, arch: dict[str, Any], *, training: bool = False,
           document_mask: bool = True, forced: KernelSettings | None = None) -> Kernels:
    """The kernels for a model of the architecture's TransformerConfig kwargs `arch` on `host`.
    `training`: gradients are computed (under megatron's DDP); `document_mask`: rows hold
    several samples that must not attend to each other (packed data)."""
    forced = forced or KernelSettings()
    why: dict[str, str] = {}
    te, why["transformer_engine"] = _choose("transformer_engine", forced.transformer_engine, _Rule(
        "" if host.cuda and host.transformer_engine else
        "it needs transformer_engine.pytorch on a CUDA host, absent here (README: On GPUs)"))
    flags = {}
    for name, rule in _rules(host, arch, te, training, document_mask).items():
        flags[name], why[name] = _choose(name, getattr(forced, name), rule)
    return Kernels(transformer_engine=te, **flags, why={k: v for k, v in why.items() if v})
