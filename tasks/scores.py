"""Stage `scores`: score vs step over the evaluated checkpoints of a training run.

Planned only when `evaluate.checkpoints` is not `last`: its upstream artifacts are the
evaluations of the chosen checkpoints (`evaluate@6`, `evaluate@12`, …, `evaluate`), so it is keyed
by exactly those and rebuilt when one is added. It writes `scores.json` (one row per iteration,
task and metric) and `scores.png` (each task's metric against the step), shown as a table and a
markdown summary in the flow run. Reading a few JSON files and drawing a chart: seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.artifacts import Manifest
from tasks.stage import BuildContext, Stage, inline_png


def score_rows(evaluations: list[Manifest]) -> list[dict[str, Any]]:
    """iteration, task, metric, value — from each evaluation's recorded scores (stderr columns
    dropped), by iteration."""
    rows = []
    for m in sorted(evaluations, key=lambda m: m.meta["iteration"]):
        for task, metrics in sorted(m.meta["scores"].items()):
            rows += [{"iteration": m.meta["iteration"], "task": task, "metric": metric,
                      "value": value}
                     for metric, value in sorted(metrics.items()) if not metric.endswith("_stderr")]
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault(f"{r['task']} {r['metric']}", []).append((r["iteration"], r["value"]))
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    for label, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("score")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def build(ctx: BuildContext) -> None:
    rows = score_rows(list(ctx.upstream.values()))
    (ctx.out / "scores.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, ctx.out / "scores.png")
    ctx.meta.update(iterations=sorted({r["iteration"] for r in rows}))


def report(manifest: Manifest) -> list[dict[str, Any]]:
    """One row per iteration, one column per task and metric."""
    table: dict[int, dict[str, Any]] = {}
    for r in json.loads((manifest.dir / "scores.json").read_text()):
        table.setdefault(r["iteration"], {"iteration": r["iteration"]})[
            f"{r['task']} {r['metric']}"] = r["value"]
    return [table[i] for i in sorted(table)]


def markdown(manifest: Manifest) -> str:
    rows = report(manifest)
    columns = [c for c in rows[0] if c != "iteration"] if rows else []
    lines = ["### Score vs step", "", inline_png(manifest.dir / "scores.png", "score vs step"), "",
             "| step | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {r['iteration']} | " + " | ".join(f"{r.get(c, float('nan')):.4f}" for c in columns)
              + " |" for r in rows]
    return "\n".join(lines)


STAGE = Stage(
    name="scores", version="1", settings=lambda s: s.evaluate, build=build,
    report=report, markdown=markdown,
    description="score vs step over the evaluated checkpoints: table and chart",
)
"""Its upstream is set per run by the planner: the chosen checkpoints' evaluations."""
