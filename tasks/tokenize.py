"""Stage `tokenize`: the dataset's chat messages → Megatron indexed datasets with loss masks.

Uses the patched tokenizer's chat template (`megatron_bridge/data/chat.py` decides the mask),
packs samples best-fit-decreasing into `seq_length` rows, and writes per split
`<split>-tokens.bin/.idx` + `<split>-mask.bin/.idx` (format: `megatron_bridge/data/indexed.py`),
`stats.json` (samples in/out, drops by reason, truncations, supervised fraction, packing
efficiency, length histogram) and `lengths.png`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from settings.errors import UserError
from settings.models import TokenizeSettings
from tasks.artifacts import Manifest
from tasks.stage import BuildContext, Stage

SPLITS = ("train", "test")


def tokenize_dataset(settings: TokenizeSettings, splits: dict[str, Path], tokenizer_dir: Path,
                     out: Path, log) -> dict[str, Any]:
    """Tokenize each split's Parquet into `out`; returns the statistics (also in stats.json)."""
    from megatron_bridge.data.pipeline import count_rows, make_masker, tokenize_split

    masker = make_masker(tokenizer_dir, settings)
    masker.check()  # before reading any data
    stats: dict[str, Any] = {"seq_length": settings.seq_length, "pack": settings.pack,
                             "tokenizer": masker.describe(), "splits": {}}
    for split, parquet in splits.items():
        total = count_rows(parquet)
        if total == 0:
            continue
        with tqdm(total=total, desc=f"tokenizing {split}", unit="sample", leave=False,
                  disable=total < 1000) as bar:
            result = tokenize_split(parquet, tokenizer_dir, out / split, settings, bar.update,
                                    masker)
        log.info("tokenize: %s: %d of %d samples in %d rows, %.1f%% packed, %d dropped, "
                 "%d truncated", split, result["samples_out"], result["samples_in"],
                 result["rows"], 100 * result["packing_efficiency"],
                 sum(result["dropped"].values()), result["truncated"])
        stats["splits"][split] = result
    train = stats["splits"].get("train")
    if train is None or train["samples_out"] == 0:
        dropped = (train or {}).get("dropped", {})
        raise UserError(f"every training sample was dropped ({dropped or 'no samples'}); "
                        "raise tokenize.seq_length or set tokenize.overlong: truncate")
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    plot_lengths(stats, out / "lengths.png")
    return stats


def plot_lengths(stats: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    for split, s in stats["splits"].items():
        hist = s["length"]["histogram"]
        ax.stairs(hist["counts"], hist["edges"], label=f"{split} ({s['samples_out']} samples)")
    ax.axvline(stats["seq_length"], color="grey", linestyle="--", label="seq_length")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version stamp: same bytes every run
    plt.close(fig)


def build(ctx: BuildContext) -> None:
    data = ctx.upstream["dataset"].dir
    splits = {s: data / f"{s}.parquet" for s in SPLITS if (data / f"{s}.parquet").is_file()}
    stats = tokenize_dataset(ctx.settings, splits, ctx.upstream["patch_tokenizer"].dir, ctx.out,
                             ctx.log)
    ctx.meta.update({split: {k: s[k] for k in ("samples_out", "rows", "tokens")}
                     for split, s in stats["splits"].items()})


def tokenize_files(data: str, fields: dict[str, str], tokenizer_dir: Path, out: Path,
                   settings: TokenizeSettings, log) -> dict[str, Any]:
    """`rsft tokenize`: the stage alone on one file or folder (normalised as the `dataset` stage
    does, without mixing or a test split), into `out` (written beside it, then renamed)."""
    import logging
    import shutil

    from megatron_bridge.files import staged_output
    from settings.models import DatasetSettings, DatasetSource
    from tasks import dataset
    from tasks.stage import BuildContext

    data_settings = DatasetSettings(sources=[DatasetSource(path=data, fields=fields)])
    try:
        with staged_output(out) as tmp:
            (tmp / ".dataset").mkdir()
            dataset.build(BuildContext(data_settings, tmp / ".dataset", {},
                                       dataset.fingerprint(data_settings), {},
                                       log or logging.getLogger("rsft.dataset")))
            stats = tokenize_dataset(settings, {"train": tmp / ".dataset" / "train.parquet"},
                                     tokenizer_dir, tmp, log)
            shutil.rmtree(tmp / ".dataset")
    except FileExistsError as e:
        raise UserError(str(e)) from None
    return stats


def _rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"split": split, "samples in": s["samples_in"], "samples out": s["samples_out"],
             "dropped": sum(s["dropped"].values()), "truncated": s["truncated"],
             "rows": s["rows"], "tokens": s["tokens"],
             "supervised %": round(100 * s["supervised_fraction"], 1),
             "packing %": round(100 * s["packing_efficiency"], 2),
             "max length": s["length"]["max"]} for split, s in stats["splits"].items()]


def report(manifest: Manifest) -> list[dict[str, Any]]:
    return _rows(json.loads((manifest.dir / "stats.json").read_text()))


def markdown(manifest: Manifest) -> str:
    stats = json.loads((manifest.dir / "stats.json").read_text())
    lines = [f"### Tokenized dataset (seq_length {stats['seq_length']}, "
             f"{'packed' if stats['pack'] else 'one sample per row'})", ""]
    for split, s in stats["splits"].items():
        drops = ", ".join(f"{k}: {v}" for k, v in s["dropped"].items()) or "none"
        lines += [f"**{split}**: {s['samples_out']} of {s['samples_in']} samples in {s['rows']} rows; "
                  f"{s['tokens']:,} tokens, {100 * s['supervised_fraction']:.1f}% supervised; "
                  f"packing efficiency {100 * s['packing_efficiency']:.2f}%; dropped: {drops}; "
                  f"truncated: {s['truncated']}; length min/mean/max "
                  f"{s['length']['min']}/{s['length']['mean']:.0f}/{s['length']['max']}", ""]
    lines.append(f"Files: `{manifest.dir}` (`lengths.png` is the length histogram)")
    return "\n".join(lines)


STAGE = Stage(
    name="tokenize", version="1", settings=lambda s: s.tokenize, build=build,
    upstream=("dataset", "patch_tokenizer"), report=report, markdown=markdown,
    description="chat-templated, response-masked, packed Megatron indexed datasets",
)
