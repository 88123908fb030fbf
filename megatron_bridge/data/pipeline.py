"""Streaming, multi-process tokenization of a chat dataset into the packed SFT format.

Parquet record batches (columns `messages`, `source`, `row`) are cut into fixed chunks and
tokenized by a pool of worker processes (each renders and encodes single-threaded; processes
scale better than the Rust tokenizer's threads and also parallelise the template rendering).
Results come back in chunk order, so the output bytes do not depend on the worker count. Samples
stream to a temporary one-sample-per-row dataset, then are packed (best-fit decreasing over the
whole dataset) into the final rows: memory holds the lengths, never the samples.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_bridge.data.chat import ChatMasker
from megatron_bridge.data.indexed import SFTWriter, paths
from megatron_bridge.data.packing import best_fit_decreasing
from settings.errors import UserError
from settings.models import TokenizeSettings

CHUNK = 128  # samples per worker task: fixed, so chunking never depends on the worker count
HISTOGRAM_BINS = 32



# -- workers -------------------------------------------------------------------------------------
_masker: ChatMasker | None = None


def _init_worker(spec: dict[str, Any]) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    global _masker
    _masker = ChatMasker.from_spec(spec)


def make_masker(tokenizer_dir: Path, settings: TokenizeSettings) -> ChatMasker:
    return ChatMasker(tokenizer_dir, settings.assistant_turns, settings.supervise_control_token,
                      settings.control_tokens)


def _encode_chunk(batch: list[list[dict[str, str]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    assert _masker is not None
    return _masker.encode(batch)


# -- reading -------------------------------------------------------------------------------------
def read_chunks(parquet: Path) -> Iterator[tuple[list[Any], list[str]]]:
    """(messages, location) chunks of CHUNK samples."""
    import pyarrow.parquet as pq

    messages: list[Any] = []
    where: list[str] = []
    for batch in pq.ParquetFile(parquet).iter_batches(batch_size=1024,
                                                      columns=["messages", "source", "row"]):
        cols = batch.to_pydict()
        messages += cols["messages"]
        where += [f"{s} record {r}" for s, r in zip(cols["source"], cols["row"])]
        while len(messages) >= CHUNK:
            yield messages[:CHUNK], where[:CHUNK]
            messages, where = messages[CHUNK:], where[CHUNK:]
    if messages:
        yield messages, where


def count_rows(parquet: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(parquet).metadata.num_rows


def encoded(parquet: Path, masker: ChatMasker, settings: TokenizeSettings
            ) -> Iterator[tuple[str, tuple[np.ndarray, np.ndarray]]]:
    """(location, (ids, mask)) per sample, in dataset order."""
    chunks_total = -(-count_rows(parquet) // CHUNK)
    # A pool costs seconds of start-up (spawned interpreters import transformers): not worth it
    # for a couple of chunks. The bytes are the same either way.
    workers = min(settings.workers or os.cpu_count() or 1, max(chunks_total // 2, 1))
    chunks = read_chunks(parquet)
    if workers == 1:
        for batch, where in chunks:
            yield from zip(where, masker.encode(batch))
        return
    context = multiprocessing.get_context("spawn")  # fork is unsafe under Prefect's threads
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(masker.spec(),)) as pool:
        pending: list[tuple[Any, list[str]]] = []
        for batch, where in chunks:
            pending.append((pool.submit(_encode_chunk, batch), where))
            if len(pending) >= 3 * workers:  # bounded: a few chunks in flight per worker
                future, locations = pending.pop(0)
                yield from zip(locations, future.result())
        for future, locations in pending:
            yield from zip(locations, future.result())


# -- the split -----------------------------------------------------------------------------------
@dataclass
class Stats:
    samples_in: int = 0
    samples_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    rows: int = 0
    seq_length: int = 0
    lengths: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lengths = np.asarray(self.lengths, dtype=np.int64)
        counts, edges = np.histogram(lengths, bins=HISTOGRAM_BINS, range=(0, self.seq_length))
        slots = self.rows * self.seq_length
        return {
            "samples_in": self.samples_in, "samples_out": self.samples_out,
            "dropped": dict(self.dropped), "truncated": self.truncated,
            "tokens": self.tokens, "supervised_tokens": self.supervised_tokens,
            "supervised_fraction": self.supervised_tokens / max(self.tokens, 1),
            "rows": self.rows, "seq_length": self.seq_length,
            "packing_efficiency": self.tokens / max(slots, 1),
            "length": {"min": int(lengths.min()) if len(lengths) else 0,
                       "max": int(lengths.max(initial=0)),
                       "mean": float(lengths.mean()) if len(lengths) else 0.0,
                       "histogram": {"edges": edges.astype(int).tolist(),
                                     "counts": counts.tolist()}},
        }


def tokenize_split(parquet: Path, tokenizer_dir: Path, prefix: Path, settings: TokenizeSettings,
                   on_progress: Callable[[int], None] = lambda n: None,
                   masker: ChatMasker | None = None) -> dict[str, Any]:
    """Tokenize one split into `<prefix>-tokens/-mask` indexed datasets; returns statistics.
    Raises TemplateError / UserError for problems the settings do not allow. Pass a `masker`
    already built for `tokenizer_dir` to skip loading the tokenizer again."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    stats = Stats(seq_length=settings.seq_length)
    staging = prefix.with_name(prefix.name + ".staging")
    writer = SFTWriter(staging)
    limit = settings.seq_length
    masker = masker or make_masker(tokenizer_dir, settings)
    for where, (ids, mask) in encoded(parquet, masker, settings):
        stats.samples_in += 1
        on_progress(1)
        if len(ids) > limit:
            if settings.overlong == "error":
                raise UserError(f"{where}: {len(ids)} tokens is longer than tokenize.seq_length="
                                f"{limit}; raise it, or set tokenize.overlong: drop or truncate")
            if settings.overlong == "drop":
                stats.dropped["overlong"] += 1
                continue
            ids, mask = ids[:limit], mask[:limit]
            if not mask.any():
                stats.dropped["prompt_fills_seq_length"] += 1
                continue
            stats.truncated += 1
        writer.add_row([(ids, mask)])
        stats.samples_out += 1
        stats.tokens += len(ids)
        stats.supervised_tokens += int(mask.sum())
        stats.lengths.append(len(ids))
    writer.finalize()
    try:
        if stats.samples_out == 0:  # nothing to write (the caller decides if that is an error)
            return stats.summary()
        rows = (best_fit_decreasing(np.asarray(stats.lengths), limit) if settings.pack
                else [[i] for i in range(len(stats.lengths))])
        stats.rows = len(rows)
        tokens = IndexedDataset(str(staging.with_name(staging.name + "-tokens")))
        masks = IndexedDataset(str(staging.with_name(staging.name + "-mask")))
        final = SFTWriter(prefix)
        for row in rows:
            final.add_row([(tokens[i], masks[i]) for i in row])
        final.finalize()
        del tokens, masks
    finally:
        for f in paths(staging).values():
            f.unlink(missing_ok=True)
    return stats.summary()


