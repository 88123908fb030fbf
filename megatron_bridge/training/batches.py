"""Data order and batch tensors.

Order: epoch e is a permutation of the rows seeded by (seed, e); global batch k takes the next
`global_batch_size` rows of the concatenated epochs, so the position is a pure function of the
step — a resumed run continues exactly where the saved one stopped. Data-parallel rank r takes
its contiguous slice of each global batch, cut into micro-batches.

Tensors for a micro-batch of packed rows (padded to `seq_length` at the end):
- `tokens`, `labels` (the next token *within the same sample*), `loss_mask` (the data's mask of
  the label token; 0 at each sample's last position and on padding, so nothing crosses a sample
  boundary), `position_ids` (restarting at 0 for every sample);
- without Transformer Engine: `attention_mask` [b, 1, s, s], True where attention is *blocked*:
  causal and block-diagonal over samples (padding is one more block, so no row is fully masked);
- with it: `cu_seqlens` (THD `PackedSeqParams`: each sample is its own sequence; micro-batch 1).

Built on the host; `to(cuda)` copies asynchronously from pinned memory, and `cu_seqlens` travels
with the rest while `max_seqlen` is read from the host's lengths (no device-to-host sync).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from megatron_bridge.data.indexed import SFTDataset


@dataclass
class MicroBatch:
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor  # [b, s] sample index within the row; padding gets its own index
    lengths: list[list[int]]  # per row: sample lengths (padding excluded)
    cu_seqlens: torch.Tensor | None = field(default=None)
    """THD sequence boundaries of a one-row micro-batch (padding as a last sequence)."""

    TENSORS = ("tokens", "labels", "loss_mask", "position_ids", "segments", "cu_seqlens")

    def __post_init__(self) -> None:
        if self.cu_seqlens is None and self.tokens.shape[0] == 1:
            self.cu_seqlens = torch.tensor([0, *np.cumsum(self.sequence_lengths()).tolist()],
                                           dtype=torch.int32)

    def to(self, device: torch.device) -> "MicroBatch":
        """This micro-batch on `device`; to CUDA by a non-blocking copy from pinned memory (a
        copy from pageable memory would wait for the GPU)."""
        if self.tokens.device == device:
            return self
        cuda = device.type == "cuda"
        return replace(self, **{
            f: t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)
            for f in self.TENSORS if (t := getattr(self, f)) is not None})

    def attention_mask(self) -> torch.Tensor:
        s = self.tokens.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=self.segments.device).triu(1)
        other = self.segments[:, :, None] != self.segments[:, None, :]
        return (causal[None] | other)[:, None]

    def sequence_lengths(self) -> list[int]:
        """The THD sequences of a one-row micro-batch: its samples, then its padding."""
        assert self.tokens.shape[0] == 1, "THD packing takes one row per micro-batch"
        lengths = list(self.lengths[0])
        if (pad := self.tokens.shape[1] - sum(lengths)) > 0:
            lengths.append(pad)
        return lengths

    def packed_seq_params(self):
        """megatron-core's THD description of a one-row micro-batch, on the batch's device."""
        from megatron.core.packed_seq_params import PackedSeqParams

        longest = max(self.sequence_lengths())
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens,
                               cu_seqlens_kv=self.cu_seqlens, max_seqlen_q=longest,
                               max_seqlen_kv=longest)


def order(rows: int, seed: int, start: int, count: int) -> np.ndarray:
    """Row indices number `start` .. `start + count` of the endless seeded epoch sequence."""
    out = []
    epoch, offset = divmod(start, rows)
    while count > 0:
        perm = np.random.default_rng([seed, epoch]).permutation(rows)
        take = perm[offset:offset + count]
        out.append(take)
        count -= len(take)
        epoch, offset = epoch + 1, 0
    return np.concatenate(out)


def pack_rows(dataset: SFTDataset, rows: np.ndarray, seq_length: int) -> MicroBatch:
    b = len(rows)
    tokens = torch.zeros(b, seq_length, dtype=torch.long)
    labels = torch.zeros(b, seq_length, dtype=torch.long)
    loss_mask = torch.zeros(b, seq_length, dtype=torch.float32)
    position = torch.zeros(b, seq_length, dtype=torch.long)
    segments = torch.zeros(b, seq_length, dtype=torch.long)
    all_lengths = []
    for i, row in enumerate(rows):
        ids, mask, lengths = dataset.row(int(row))
        n = len(ids)
        if n > seq_length:
            raise ValueError(f"row {row} has {n} tokens, more than seq_length {seq_length}")
        ids_t, mask_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.float32))
        tokens[i, :n] = ids_t
        start = 0
        for k, length in enumerate(lengths.tolist()):
            end = start + length
            labels[i, start:end - 1] = ids_t[start + 1:end]
            loss_mask[i, start:end - 1] = mask_t[start + 1:end]
            position[i, start:end] = torch.arange(length)
            segments[i, start:end] = k
            start = end
        segments[i, n:] = len(lengths)
        position[i, n:] = torch.arange(seq_length - n)
        all_lengths.append(lengths.tolist())
    return MicroBatch(tokens, labels, loss_mask, position, segments, all_lengths)


class Batches:
    """Micro-batches of this data-parallel rank for any optimizer step."""

    def __init__(self, dataset: SFTDataset, seq_length: int, global_batch: int, micro_batch: int,
                 dp_rank: int, dp_size: int, seed: int):
        self.dataset, self.seq_length, self.seed = dataset, seq_length, seed
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def step(self, step: int) -> list[MicroBatch]:
        rows = order(len(self.dataset), self.seed, step * self.global_batch, self.global_batch)
        per_rank = self.global_batch // self.dp_size
        mine = rows[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        return [pack_rows(self.dataset, mine[i:i + self.micro_batch], self.seq_length)
                for i in range(0, per_rank, self.micro_batch)]


class Validation:
    """This data-parallel rank's share of the validation rows: the first `eval_iters` global
    batches of the test split, or all of it (None), in the split's order; rank r takes rows
    r, r + dp, … one row per micro-batch (uniform shapes for the pipeline schedule, and every
    row counted exactly once whatever the layout)."""

    def __init__(self, dataset: SFTDataset, seq_length: int, eval_iters: int | None,
                 global_batch: int, dp_rank: int, dp_size: int):
        self.dataset, self.seq_length = dataset, seq_length
        total = len(dataset) if eval_iters is None else min(len(dataset), eval_iters * global_batch)
        self.rows = np.arange(total)[dp_rank::dp_size]

    def __len__(self) -> int:
        return len(self.rows)

    def micro_batches(self):
        """Built as the schedule asks for them (a whole test split is not held in memory)."""
        for row in self.rows:
            yield pack_rows(self.dataset, np.array([row]), self.seq_length)
