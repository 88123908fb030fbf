"""Stage `dataset`: the SFT mixture as normalised chat messages, with a carved test split.

Each source is read as a stream and normalised (`tasks/data_sources.py`) into a temporary Arrow
file; the mixture is then a list of (source, row) positions, so memory holds indices, never the
whole dataset. Order of operations (all seeded by `dataset.seed`):
1. a weight below 1 keeps that fraction of a source's rows;
2. the test split is carved from the distinct selected rows, so no test row is also trained on;
3. a weight above 1 upsamples the remaining train rows (2.5 = twice each + a seeded half);
4. train rows are shuffled.
The optional hybrid builder then turns a seeded share of `<think>…</think>` answers into
`<short>` answers (Thinkless warm-up data). Output: `train.parquet`, `test.parquet`
(columns `messages`, `source`, `row`, `variant`) and `stats.json` (counts per source).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from settings.errors import UserError
from settings.models import DatasetSettings, HybridSettings
from tasks import data_sources
from tasks.artifacts import Manifest
from tasks.data_sources import BadRecord
from tasks.stage import BuildContext, Stage

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SCHEMA = pa.schema([("messages", pa.list_(MESSAGE)), ("source", pa.string()),
                    ("row", pa.int64()), ("variant", pa.string())])
BATCH = 2048


def fingerprint(settings: DatasetSettings) -> dict[str, Any]:
    return {"sources": [data_sources.fingerprint(s, f"dataset.sources[{i}].path")
                        for i, s in enumerate(settings.sources)]}


# -- 1. normalise each source into an Arrow file --------------------------------------------------
def short_form(answer: str, control_token: str) -> str | None:
    """`<short>\\n` + the text after `</think>`, or None when the answer has no closed reasoning
    followed by a solution."""
    if "</think>" not in answer:
        return None
    solution = answer.split("</think>", 1)[1].strip()
    return f"{control_token}\n{solution}" if solution else None


def normalise(index: int, settings: DatasetSettings, fp: dict[str, Any], path: Path,
              log) -> dict[str, Any]:
    """Write source `index`'s usable records to an Arrow file; returns its counts (and the
    positions of rows eligible for a short form)."""
    source = settings.sources[index]
    field = f"dataset.sources[{index}]"
    bad: Counter[str] = Counter()
    eligible: list[int] = []
    records = kept = 0
    rows: list[dict[str, Any]] = []
    fields = source.fields
    with pa.ipc.new_file(str(path), SCHEMA) as writer:
        for where, record in data_sources.read_source(source, fp, f"{field}.path"):
            records += 1
            if not fields and not isinstance(record, BadRecord):
                fields = data_sources.detect_fields(record, f"{field}: {where}")
            try:
                messages = data_sources.to_messages(record, fields, where)
            except BadRecord as e:
                if settings.on_bad_sample == "error":
                    raise UserError(f"{field}: {e} (or set dataset.on_bad_sample: skip to drop "
                                    "and count such records)") from None
                bad[e.reason] += 1
                continue
            if short_form(messages[-1]["content"], settings.hybrid.control_token) is not None \
                    and messages[-1]["role"] == "assistant":
                eligible.append(kept)
            rows.append({"messages": messages, "source": source.path, "row": records - 1,
                         "variant": "original"})
            kept += 1
            if len(rows) == BATCH:
                writer.write_batch(pa.RecordBatch.from_pylist(rows, SCHEMA))
                rows.clear()
        if rows:
            writer.write_batch(pa.RecordBatch.from_pylist(rows, SCHEMA))
    if bad:
        log.warning("dataset: %s skipped %d records: %s", field, sum(bad.values()), dict(bad))
    return {"path": source.path, "records": records, "usable": kept, "bad": dict(bad),
            "eligible": np.asarray(eligible, dtype=np.int64)}


# -- 2. the mixture as positions ------------------------------------------------------------------
def test_count(test_split: float, total: int) -> int:
    count = int(test_split) if test_split >= 1 else round(test_split * total)
    if test_split and count >= total:
        raise UserError(f"dataset.test_split={test_split} leaves no training rows out of {total}; "
                        "lower it")
    return count


def mixture(usable: list[int], weights: list[float], test_split: float, seed: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) as int64 arrays of (source, row position) pairs, in their final order."""
    rng = np.random.default_rng(seed)
    selected = []
    for i, (n, w) in enumerate(zip(usable, weights)):
        rows = np.arange(n) if w >= 1 else np.sort(rng.choice(n, round(w * n), replace=False))
        selected.append(np.stack([np.full(len(rows), i), rows], axis=1))
    distinct = np.concatenate(selected) if selected else np.zeros((0, 2), np.int64)
    distinct = distinct[rng.permutation(len(distinct))]
    n_test = test_count(test_split, len(distinct))
    test, train = distinct[:n_test], distinct[n_test:]
    parts = []
    for i, w in enumerate(weights):
        mine = train[train[:, 0] == i]
        copies = max(int(w), 1)
        extra = round((w - int(w)) * len(mine)) if w > 1 else 0
        parts += [mine] * copies + [mine[np.sort(rng.choice(len(mine), extra, replace=False))]]
    train = np.concatenate(parts) if parts else train
    return train[rng.permutation(len(train))].astype(np.int64), test.astype(np.int64)


def short_rows(eligible: list[np.ndarray], hybrid: HybridSettings) -> set[tuple[int, int]]:
    """The (source, row) pairs that get a short form: a seeded `ratio` of the eligible ones."""
    if not hybrid.enabled:
        return set()
    rng = np.random.default_rng(hybrid.seed)
    chosen = set()
    for i, rows in enumerate(eligible):
        picked = rng.choice(len(rows), round(hybrid.ratio * len(rows)), replace=False)
        chosen.update((i, int(r)) for r in rows[picked])
    return chosen


# -- 3. write a split ---------------------------------------------------------------------------
def write_split(order: np.ndarray, tables: list[pa.Table], shorts: set[tuple[int, int]],
                hybrid: HybridSettings, path: Path) -> Counter[str]:
    """Rows in `order` (pairs) to Parquet, chunk by chunk; returns counts by variant."""
    counts: Counter[str] = Counter()
    with pq.ParquetWriter(str(path), SCHEMA) as writer:
        for start in range(0, len(order), BATCH):
            chunk = order[start:start + BATCH]
            rows = []
            for i in np.unique(chunk[:, 0]):
                at = np.nonzero(chunk[:, 0] == i)[0]
                taken = tables[i].take(pa.array(chunk[at, 1])).to_pylist()
                rows += zip(at.tolist(), taken, chunk[at, 1].tolist(), [int(i)] * len(at))
            out = []
            for _, row, position, source in sorted(rows, key=lambda r: r[0]):
                if (source, position) in shorts:
                    messages = [*row["messages"][:-1], {"role": "assistant", "content": short_form(
                        row["messages"][-1]["content"], hybrid.control_token)}]
                    if hybrid.keep_long:
                        out.append(row)
                    out.append({**row, "messages": messages, "variant": "short"})
                else:
                    out.append(row)
            counts.update(r["variant"] for r in out)
            writer.write_table(pa.Table.from_pylist(out, SCHEMA))
    return counts


def build(ctx: BuildContext) -> None:
    settings: DatasetSettings = ctx.settings
    tmp = ctx.out / ".sources"
    tmp.mkdir()
    per_source = []
    for i in range(len(settings.sources)):
        per_source.append(normalise(i, settings, ctx.fingerprint["sources"][i],
                                    tmp / f"{i}.arrow", ctx.log))
        ctx.log.info("dataset: source %d (%s): %d usable of %d records", i,
                     settings.sources[i].path, per_source[-1]["usable"], per_source[-1]["records"])
    usable = [s["usable"] for s in per_source]
    if sum(usable) == 0:
        raise UserError("no usable records in any source; check dataset.sources")
    train, test = mixture(usable, [s.weight for s in settings.sources], settings.test_split,
                          settings.seed)
    shorts = short_rows([s["eligible"] for s in per_source], settings.hybrid)
    tables = [pa.ipc.open_file(pa.memory_map(str(tmp / f"{i}.arrow"))).read_all()
              for i in range(len(settings.sources))]
    variants = {split: write_split(order, tables, shorts, settings.hybrid, ctx.out / f"{split}.parquet")
                for split, order in (("train", train), ("test", test))}
    del tables
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    stats = {
        "sources": [{
            "path": s["path"], "weight": src.weight, "records": s["records"],
            "usable": s["usable"], "bad": s["bad"],
            "train": int((train[:, 0] == i).sum()), "test": int((test[:, 0] == i).sum()),
        } for i, (s, src) in enumerate(zip(per_source, settings.sources))],
        "train": sum(variants["train"].values()), "test": sum(variants["test"].values()),
        "variants": {k: dict(v) for k, v in variants.items()},
    }
    (ctx.out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    ctx.meta.update(train=stats["train"], test=stats["test"],
                    bad=sum(sum(s["bad"].values()) for s in per_source))


def report(manifest: Manifest) -> list[dict[str, Any]]:
    stats = json.loads((manifest.dir / "stats.json").read_text())
    return [{"source": s["path"], "weight": s["weight"], "records": s["records"],
             "usable": s["usable"], "skipped": sum(s["bad"].values()), "train rows": s["train"],
             "test rows": s["test"]} for s in stats["sources"]]


STAGE = Stage(
    name="dataset", version="1", settings=lambda s: s.dataset, build=build,
    fingerprint=fingerprint, report=report,
    description="the SFT mixture as chat messages (train/test Parquet)",
)
