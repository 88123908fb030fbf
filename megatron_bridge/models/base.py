"""What an architecture table is made of: parameter mappings with a kind that says how an HF
tensor becomes one tensor-parallel rank's Megatron tensor, and back (pure reshapes, so every round
trip is bit-exact)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch


class Kind(Enum):
    REPLICATED = "replicated"  # every rank holds the whole tensor (norms)
    COLUMN = "column"  # split along dim 0
    ROW = "row"  # split along dim 1
    VOCAB = "vocab"  # padded to the Megatron vocab size, then split along dim 0
    QKV = "qkv"  # q, k, v interleaved per query group ([q heads; k; v] each), groups split
    GATED_MLP = "gated_mlp"  # [gate; up], each split, concatenated per rank


@dataclass(frozen=True)
class Geometry:
    """What the mapping kinds need to know about the model and the layout."""

    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    """The HF (true) vocabulary size."""
    padded_vocab_size: int
    tp: int


@dataclass(frozen=True)
class ParamMap:
    megatron: str
    """Megatron (local spec) parameter name; `{L}` stands for the global layer index."""
    hf: tuple[str, ...]
    """HF parameter name(s), same `{L}`; several for fused kinds (QKV: q, k, v; GATED_MLP: gate, up)."""
    kind: Kind


@dataclass(frozen=True)
class Architecture:
    name: str
    hf_architectures: tuple[str, ...]
    params: tuple[ParamMap, ...]
    """Every Megatron parameter of a layer-0 / non-layer model, in one table."""
    config: Callable[[dict[str, Any]], dict[str, Any]]
    """HF config.json → TransformerConfig kwargs + `model` kwargs for GPTModel."""


def to_megatron(kind: Kind, hf: list[torch.Tensor], geo: Geometry, rank: int) -> torch.Tensor:
    """HF tensor(s) → tensor-parallel rank `rank`'s Megatron tensor."""
    tp = geo.tp
    if kind is Kind.REPLICATED:
        return hf[0]
    if kind is Kind.COLUMN:
        return hf[0].chunk(tp, dim=0)[rank]
    if kind is Kind.ROW:
        return hf[0].chunk(tp, dim=1)[rank]
    if kind is Kind.VOCAB:
        w = hf[0]
        pad = geo.padded_vocab_size - w.shape[0]
        if pad:
            w = torch.cat([w, w.new_zeros((pad, *w.shape[1:]))])
        return w.chunk(tp, dim=0)[rank]
    if kind is Kind.GATED_MLP:
        gate, up = hf
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]])
    if kind is Kind.QKV:
        q, k, v = hf
        g, d = geo.num_query_groups, geo.head_dim
        rest = q.shape[1:]
        fused = torch.cat([q.reshape(g, -1, d, *rest), k.reshape(g, 1, d, *rest),
                           v.reshape(g, 1, d, *rest)], dim=1)
        return fused.chunk(tp, dim=0)[rank].reshape(-1, *rest)
    raise ValueError(kind)


def to_hf(kind: Kind, shards: list[torch.Tensor], geo: Geometry) -> list[torch.Tensor]:
    """Every rank's Megatron tensor (rank order) → the HF tensor(s)."""
    if kind is Kind.REPLICATED:
        return [shards[0]]
    if kind is Kind.COLUMN:
        return [torch.cat(shards, dim=0)]
    if kind is Kind.ROW:
        return [torch.cat(shards, dim=1)]
    if kind is Kind.VOCAB:
        return [torch.cat(shards, dim=0)[: geo.vocab_size]]
    if kind is Kind.GATED_MLP:
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    if kind is Kind.QKV:
        g, d, heads = geo.num_query_groups, geo.head_dim, geo.num_heads
        per_group = heads // g
        rest = shards[0].shape[1:]
        fused = torch.cat(shards, dim=0).reshape(g, per_group + 2, d, *rest)
        q, k, v = fused.split([per_group, 1, 1], dim=1)
        return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]
    raise ValueError(kind)
