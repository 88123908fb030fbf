"""The tokenized SFT dataset on disk: two Megatron indexed datasets with the same layout.

    <prefix>-tokens.bin/.idx   token ids (int32)
    <prefix>-mask.bin/.idx     loss mask (uint8): 1 where the token is a training target

Both are `megatron.core.datasets.indexed_dataset.IndexedDataset`s. A *sequence* is one sample (a
whole conversation: its tokens are never split); a *document* is one training row — several
samples packed together, or one sample when packing is off. No padding is stored: the trainer
pads each row to the sequence length. The targets of a sample are its own tokens shifted by
one; the first token of every sample has mask 0, so no label ever crosses a sample boundary,
and `sequence_lengths` give the boundaries (cu_seqlens for THD attention, a block-diagonal mask
on CPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from settings.errors import UserError


def paths(prefix: Path) -> dict[str, Path]:
    prefix = Path(prefix)
    return {f"{part}.{ext}": prefix.with_name(f"{prefix.name}-{part}.{ext}")
            for part in ("tokens", "mask") for ext in ("bin", "idx")}


class SFTWriter:
    """Appends rows (lists of samples) to the two indexed datasets."""

    def __init__(self, prefix: Path):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = Path(prefix)
        p = paths(self.prefix)
        self.tokens = IndexedDatasetBuilder(str(p["tokens.bin"]), dtype=np.int32)
        self.mask = IndexedDatasetBuilder(str(p["mask.bin"]), dtype=np.uint8)

    def add_row(self, samples: list[tuple[np.ndarray, np.ndarray]]) -> None:
        lengths = [len(t) for t, _ in samples]
        self.tokens.add_document(np.concatenate([t for t, _ in samples]), lengths)
        self.mask.add_document(np.concatenate([m for _, m in samples]), lengths)

    def finalize(self) -> None:
        p = paths(self.prefix)
        self.tokens.finalize(str(p["tokens.idx"]))
        self.mask.finalize(str(p["mask.idx"]))


class SFTDataset:
    """Rows of a tokenized SFT dataset: (tokens, mask, sample lengths) per row."""

    def __init__(self, prefix: Path):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        p = paths(prefix)
        missing = [str(f) for f in p.values() if not f.is_file()]
        if missing:
            raise UserError(f"tokenized dataset is incomplete: {missing[0]} is missing")
        self.tokens = IndexedDataset(str(Path(prefix).with_name(Path(prefix).name + "-tokens")))
        self.mask = IndexedDataset(str(Path(prefix).with_name(Path(prefix).name + "-mask")))
        # Copies: views into the index's mmap would dangle once this object is gone.
        self.rows = np.array(self.tokens.document_indices)
        self.lengths = np.array(self.tokens.sequence_lengths)
        if not np.array_equal(self.rows, self.mask.document_indices) or not np.array_equal(
                self.lengths, self.mask.sequence_lengths):
            raise UserError(f"{prefix}: tokens and mask datasets do not have the same layout")

    def __len__(self) -> int:
        return len(self.rows) - 1

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        first, last = int(self.rows[i]), int(self.rows[i + 1])
        lengths = self.lengths[first:last]
        tokens = np.concatenate([self.tokens[j] for j in range(first, last)])
        mask = np.concatenate([self.mask[j] for j in range(first, last)])
        return tokens, mask, lengths
