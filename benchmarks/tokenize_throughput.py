"""Tokenization throughput and packing efficiency of the SFT data pipeline on real R1 traces.

The 505 real DeepSeek-R1 traces (shared/assets/data) are repeated to ≥ --min-tokens and rendered
with the patched R1-Distill tokenizer (examples/, patched as the `patch_tokenizer` stage does).
Measured, on the same texts and all cores:
  - raw: the Rust `tokenizers.Tokenizer.encode_batch` on the full rendered conversations
    (rendered up front, not timed; the tokenizer's own thread pool), and `encode_batch_fast`
    (no offsets), the call the pipeline's ChatMasker makes;
  - pipeline: `tokenize_split` (workers=0: one spawned process per core, render + encode + mask
    checks, staging write, packing at --seq, final write), as wall time and without its start-up
    (pool spawn, imports, tokenizer load: the same call on a tiny file of one-line samples);
  - seed-style: a per-sample `apply_chat_template(tokenize=True)` loop plus the prompt-only
    render for labels, as the seed did it, on the first --seed-samples samples.
Targets: pipeline ≥ 0.9× raw tokens/s; best-fit-decreasing packing ≥ 98% of the row slots at
seq 4096 and 16384 (shown next to the padded layout, one sample per row).

    python benchmarks/tokenize_throughput.py [--min-tokens 3000000] [--seq 16384] [--seed-samples 300]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from megatron_bridge.data.chat import ChatMasker
from megatron_bridge.data.packing import best_fit_decreasing
from megatron_bridge.data.pipeline import CHUNK, tokenize_split
from settings.models import TokenizeSettings

# Anything heavier is imported inside functions: the pipeline's spawned workers re-import this
# script (as __mp_main__), and its imports would be counted as the pipeline's start-up.

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared/assets/data/openmathreasoning_r1_505.jsonl"
TOKENIZER = ROOT / "examples/tokenizers/deepseek-r1-distill-qwen-1.5b"


def patched_tokenizer(out: Path) -> Path:
    from settings.models import PatchTokenizerSettings
    from tasks.patch_tokenizer import TOKENIZER_FILES, patch_folder

    out.mkdir()
    for name in TOKENIZER_FILES:
        if (TOKENIZER / name).is_file():
            shutil.copyfile(TOKENIZER / name, out / name)
    patch_folder(out, PatchTokenizerSettings())  # the defaults are the tiny preset's edits
    return out


def write_parquet(path: Path, conversations: list[list[dict[str, str]]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.dataset import SCHEMA

    rows = [{"messages": m, "source": "openmathreasoning_r1_505", "row": i, "variant": "original"}
            for i, m in enumerate(conversations)]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)


def timed(repeats: int, run) -> tuple[list[float], object]:
    """Wall seconds of each run, and the last run's result (the previous one is freed before the
    clock starts, so no run pays for the last one's deallocation)."""
    times, result = [], None
    for _ in range(repeats):
        result = None
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return times, result


def packing(lengths: np.ndarray, seq: int) -> tuple[int, int, float, float]:
    """(samples that fit, rows, packed efficiency, padded efficiency)."""
    kept = lengths[lengths <= seq]
    rows = len(best_fit_decreasing(kept, seq))
    return len(kept), rows, kept.sum() / (rows * seq), kept.sum() / (len(kept) * seq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-tokens", type=int, default=3_000_000)
    parser.add_argument("--seq", type=int, default=16384, help="the pipeline's seq_length")
    parser.add_argument("--seed-samples", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each timing (best shown)")
    args = parser.parse_args()
    os.environ.pop("TOKENIZERS_PARALLELISM", None)  # raw encoding: the Rust default, all cores
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (tokenize_split's import, once)
    from transformers import AutoTokenizer

    traces = [json.loads(line) for line in TRACES.read_text().splitlines() if line.strip()]
    base = [[{"role": "user", "content": t["problem"]},
             {"role": "assistant", "content": t["generated_solution"]}] for t in traces]
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="rsft-tokenize-bench-") as tmp:
        tmp_path = Path(tmp)
        tokenizer = patched_tokenizer(tmp_path / "tokenizer")
        masker = ChatMasker(tokenizer)
        backend = masker.backend
        per_copy = sum(len(e.ids) for e in backend.encode_batch(
            masker.render(base, add_generation_prompt=False), add_special_tokens=False))
        conversations = base * math.ceil(args.min_tokens / per_copy)
        texts = masker.render(conversations, add_generation_prompt=False)
        raw, encodings = timed(args.repeats, lambda: backend.encode_batch(
            texts, add_special_tokens=False))
        lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
        tokens = int(lengths.sum())
        del encodings
        fast, _ = timed(args.repeats, lambda: len(backend.encode_batch_fast(
            texts, add_special_tokens=False)))

        # Start-up: the same call on a tiny file with enough chunks to start every worker.
        probe = [{"role": "user", "content": "What is 1+1?"},
                 {"role": "assistant", "content": "<think>\n1+1=2\n</think>\n\n2"}]
        write_parquet(tmp_path / "tiny.parquet", [probe] * (4 * CHUNK * cores))
        write_parquet(tmp_path / "traces.parquet", conversations)
        settings = TokenizeSettings(seq_length=args.seq, workers=0)
        startup, _ = timed(args.repeats, lambda: tokenize_split(
            tmp_path / "tiny.parquet", tokenizer, tmp_path / "tiny", settings))
        wall, stats = timed(args.repeats, lambda: tokenize_split(
            tmp_path / "traces.parquet", tokenizer, tmp_path / "sft", settings))

        hf = AutoTokenizer.from_pretrained(str(tokenizer))
        seed_tokens, start = 0, time.perf_counter()
        for messages in conversations[: args.seed_samples]:  # how the seed built ids and labels
            ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
            hf.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True,
                                   return_dict=False)
            seed_tokens += len(ids)
        seed = time.perf_counter() - start

    print(f"data: {len(base)} real R1 traces × {len(conversations) // len(base)} = "
          f"{len(conversations)} samples, {tokens / 1e6:.2f} M tokens (mean {lengths.mean():.0f}, "
          f"max {lengths.max()}); {cores} cores")
    if stats["tokens"] != tokens:
        print(f"NOTE: the pipeline kept {stats['tokens']} of {tokens} tokens "
              f"(dropped: {stats['dropped']})")
    runs = lambda times: "runs " + " ".join(f"{x:.2f}" for x in times) + " s"
    rows = [("raw encode_batch", tokens, min(raw), f"rendered text, Rust threads; {runs(raw)}"),
            ("raw encode_batch_fast", tokens, min(fast), f"for comparison (ChatMasker uses encode_batch); {runs(fast)}"),
            ("pipeline (wall)", stats["tokens"], min(wall),
             f"tokenize_split, packed at {args.seq}; {runs(wall)}"),
            ("pipeline − start-up", stats["tokens"], min(wall) - min(startup),
             f"start-up {min(startup):.2f} s: spawn, imports, tokenizer load ({runs(startup)})"),
            ("seed-style loop", seed_tokens, seed,
             f"apply_chat_template per sample, first {args.seed_samples} samples, 1 process")]
    raw_rate = tokens / min(raw)
    print(f"\n{'best of ' + str(args.repeats):24}{'tokens':>10}{'seconds':>9}{'tokens/s':>11}"
          f"{'× raw':>7}  target ≥ 0.9×")
    for name, n, seconds, note in rows:
        ratio = n / seconds / raw_rate
        target = ("ok" if ratio >= 0.9 else "BELOW") if name.startswith("pipeline") else ""
        print(f"{name:24}{n:10d}{seconds:9.2f}{n / seconds:11,.0f}{ratio:7.2f}  {target:6} {note}")

    print(f"\n{'packing (best fit)':24}{'samples':>9}{'rows':>7}{'per row':>9}{'packed':>9}"
          f"{'padded':>9}  target ≥ 98%")
    for seq in (4096, 16384):
        kept, n_rows, packed, padded = packing(lengths, seq)
        print(f"{'seq ' + str(seq):24}{kept:9d}{n_rows:7d}{kept / n_rows:9.2f}{packed:9.1%}"
              f"{padded:9.1%}  {'ok' if packed >= 0.98 else 'BELOW'}")
    print(f"(the pipeline's own rows at seq {args.seq}: {stats['rows']}, "
          f"{stats['packing_efficiency']:.1%} full)")


if __name__ == "__main__":
    main()
