"""Hybrid-reasoning metrics (what Thinkless reports), from lighteval's per-sample details: for each
mode — a response opening with `<think>`, with `<short>`, or neither — its share of the samples,
mean response tokens and accuracy. Accuracy is scored per sample by the task's own lighteval
metric (its per-sample scoring function on the post-processed text, as lighteval scores it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

MODES = {"think": "<think>", "short": "<short>"}

Scorer = Callable[[dict[str, Any], str], float]


def mode_of(text: str) -> str:
    head = text.lstrip()
    return next((mode for mode, tag in MODES.items() if head.startswith(tag)), "other")


def sample_scorer(config) -> Scorer | None:
    """Per-sample correctness from the task's first sampling metric (pass@k, avg@n, maj@n…);
    None when its metrics only score whole problems."""
    from lighteval.metrics.metrics_sample import SamplingMetric
    from lighteval.models.model_output import ModelResponse
    from lighteval.tasks.requests import Doc

    for metric in config.metrics:
        fn = metric.sample_level_fn
        if isinstance(fn, SamplingMetric):
            def score(doc: dict[str, Any], text: str, fn=fn) -> float:
                gold = Doc(query=doc["query"], choices=[fn.preprocess(c) for c in doc["choices"]],
                           gold_index=doc["gold_index"])
                return float(fn.compute_score(doc=gold, model_response=ModelResponse(
                    text=[fn.preprocess(text)])))
            return score
    return None


def hybrid_metrics(details: Path, scorer: Scorer | None) -> dict[str, dict[str, float]]:
    """Mode → {samples, share, mean_tokens, accuracy} over every sample of a details parquet.
    Without a per-sample scorer a sample gets its problem's first metric value."""
    import pandas as pd

    rows: dict[str, list[tuple[int, float]]] = {}
    for _, row in pd.read_parquet(details).iterrows():
        response, doc = row["model_response"], row["doc"]
        texts = list(response["text"])
        post = response.get("text_post_processed")
        scored = texts if post is None or len(post) != len(texts) else list(post)
        tokens = list(response["output_tokens"])
        problem_score = float(next(iter(row["metric"].values()), 0.0))
        for i, text in enumerate(texts):
            correct = scorer(doc, scored[i]) if scorer else problem_score
            rows.setdefault(mode_of(text), []).append((len(tokens[i]), correct))
    total = sum(len(v) for v in rows.values())
    return {mode: {"samples": len(v), "share": len(v) / total,
                   "mean_tokens": sum(t for t, _ in v) / len(v),
                   "accuracy": sum(c for _, c in v) / len(v)}
            for mode, v in sorted(rows.items())}
