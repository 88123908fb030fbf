"""Crash drills: kill -9 `rsft run` (the whole flow process group, i.e. a dead worker, or only the
stage's child process) at a random point while a stage builds, rerun, and compare every final
artifact with an uninterrupted run. Plus a full disk during publish and corrupted artifact files.

    python benchmarks/chaos.py [--drills 24] [--seed 0] [--workdir DIR] [--stages convert train]

One uninterrupted baseline run of the preset, then each drill works on a copy of the baseline's
workdir (artifacts hard-linked, scratch copied) with the target stage's artifact deleted (for train also its
scratch, or on alternate drills the scratch rolled back to its first checkpoint, as a previous
crash leaves it). `rsft run` starts in its own session; once the stage's `.tmp-<key>-*` build dir
appears the drill sleeps a random fraction of the stage's baseline build time and sends SIGKILL.
Then it records what the kill left (temp dirs, a final dir without manifest, checkpoints) and
whether `ArtifactStore.check(verify=True)` would trust it, looks for surviving stage processes,
reruns `rsft run` to completion, re-hashes every artifact and compares each stage's manifest
with the baseline's. A kill that lands after the stage already published is reported as `late`
and is not counted as a kill in that stage (the drill is retried with a shorter delay).

"Identical" is `content_hash` equality: the content hash leaves out what records how a build
went (logs, timings) and the temp path and uuid torch DCP writes into a checkpoint's `.metadata`,
so every stage but evaluate rebuilds to the same hash. Evaluate's files hold absolute paths and
lighteval's timestamped results file: those are compared normalised (VOLATILE in
chaos_checks.py), verdict `equal*`; anything else that differs is `DIFF` and fails the drill. Each drill's logs stay under
`<workdir>/drills/<n>-<stage>/`; the copied artifacts of passed drills are removed (`--keep`).
Exits non-zero unless every drill passed.
"""

from __future__ import annotations

import os
import sys

# Import the checkout this script belongs to (the runs it starts use that checkout too), not
# whichever one is pip-installed: drills are run from snapshots of the tree.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from benchmarks.chaos_checks import RULE_WHY
from benchmarks.chaos_harness import DrillResult, Harness
from tasks import STAGE_NAMES

ISSUE_STAGES = ["download", "patch_tokenizer", "convert", "tokenize", "train", "export", "evaluate"]
"""The stages the issue asks to kill (dataset builds in about a second; add it with --stages)."""


# -- the benchmark ---------------------------------------------------------------------------------
def plan(stages: list[str], drills: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """(stage, kill target, train scratch mode) per drill: stages cycle in a fresh random order;
    each stage alternates group/child kills (and train fresh/resume scratch) from a random
    start."""
    out = []
    first_target = {s: rng.random() < 0.5 for s in stages}
    count = {s: 0 for s in stages}
    order: list[str] = []
    for _ in range(drills):
        if not order:
            order = rng.sample(stages, len(stages))
        s = order.pop(0)
        flip = (count[s] % 2 == 0) == first_target[s]
        out.append((s, "group" if flip else "child", "fresh" if count[s] % 2 == 0 else "resume"))
        count[s] += 1
    return out


def print_table(results: list[DrillResult], say: Callable[[str], None] = print) -> None:
    cols = [("#", 3), ("stage", 15), ("drill", 18), ("kill target / fault", 36), ("delay", 13),
            ("left after kill", 44), ("orphans", 7), ("rerun", 5), ("identical", 9),
            ("partial reused", 14), ("result", 6)]
    say("  ".join(f"{c:<{w}}" for c, w in cols))
    for r in results:
        result = "pass" if r.passed else ("skip" if r.problems == ["skipped"] else "FAIL")
        kind = r.kind if r.kind != "kill" else ("kill" if r.mid_stage else "kill (late)")
        row = [str(r.n), r.stage, kind, r.target, r.delay, r.left, str(len(r.orphans)),
               "ok" if r.rerun_ok else "no", r.identical, str(r.partial_reused), result]
        say("  ".join(f"{v[:w]:<{w}}" for v, (_, w) in zip(row, cols)))
        for p in r.problems:
            if p != "skipped":
                say(f"      problem: {p}")
        for o in r.orphans:
            say(f"      orphan: {o}")


def _guarded(n: int, stage: str, drill: Callable[[], DrillResult]) -> DrillResult:
    """A drill whose harness broke is a failed drill, not the end of the benchmark."""
    try:
        return drill()
    except Exception as e:  # noqa: BLE001
        import traceback

        r = DrillResult(n, stage, kind="harness error")
        r.problems.append(f"{type(e).__name__}: {e}")
        traceback.print_exc()
        return r


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drills", type=int, default=24, help="kill drills (default 24)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the baseline, drills and logs go (default: a new temp dir)")
    parser.add_argument("--stages", nargs="+", choices=STAGE_NAMES, default=ISSUE_STAGES,
                        metavar="STAGE", help=f"stages to kill (default: {' '.join(ISSUE_STAGES)})")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="extra settings for every run (repeatable)")
    parser.add_argument("--no-faults", action="store_true",
                        help="skip the full-disk and corrupted-file drills")
    parser.add_argument("--reuse-baseline", action="store_true",
                        help="reuse <workdir>/baseline if it is complete and intact")
    parser.add_argument("--keep", action="store_true", help="keep passed drills' artifacts")
    parser.add_argument("--server", action="store_true",
                        help="run every `rsft run` against one Prefect server started here "
                        "(as under a worker; saves the ~10 s ephemeral server start per run)")
    parser.add_argument("--max-late-retries", type=int, default=2,
                        help="retry a drill whose kill came after the stage published")
    args = parser.parse_args()

    root = args.workdir or Path(tempfile.mkdtemp(prefix="rsft-chaos-"))
    rng = random.Random(args.seed)

    def say(line: str) -> None:
        print(line, flush=True)

    harness = Harness(root, args.sets, args.preset, say=say)
    say(f"chaos drills in {harness.root} (seed {args.seed})")
    started = time.monotonic()
    results: list[DrillResult] = []
    try:
        if args.server:
            say(f"prefect server: {harness.start_server()}")
        base = harness.baseline(reuse=args.reuse_baseline)
        n = 0
        for stage, target, scratch in plan(args.stages, args.drills, rng):
            fraction = rng.uniform(0.05, 0.95)
            for attempt in range(args.max_late_retries + 1):
                n += 1
                r = _guarded(n, stage, partial(harness.kill_drill, base, n, stage, target,
                                               fraction, scratch, keep=args.keep))
                results.append(r)
                say(f"drill {n}: {stage} {r.target} after {r.delay}: left {r.left}; rerun "
                    f"{'ok' if r.rerun_ok else 'FAILED'}, {r.identical}, "
                    f"{'pass' if r.passed else 'FAIL ' + '; '.join(r.problems + r.orphans)} "
                    f"({r.seconds:.0f} s)")
                if r.mid_stage:
                    break
                fraction /= 3  # the stage finished first: try earlier
        if not args.no_faults:
            for fault in (lambda k: harness.disk_drill(base, k, keep=args.keep),
                          lambda k: harness.corrupt_drill(base, k, "flip", keep=args.keep),
                          lambda k: harness.corrupt_drill(base, k, "truncate", keep=args.keep)):
                n += 1
                r = _guarded(n, "-", partial(fault, n))
                results.append(r)
                say(f"drill {n}: {r.kind} {r.stage}: {r.left}; "
                    f"{'pass' if r.passed else 'FAIL ' + '; '.join(r.problems)} ({r.seconds:.0f} s)")
    finally:
        harness.cleanup()
    say("")
    print_table(results, say)
    kills = [r for r in results if r.kind == "kill"]
    counted = [r for r in kills if r.mid_stage]
    per_stage = {s: sum(r.stage == s for r in counted) for s in args.stages}
    volatile = sorted({v.split(" (")[1].rstrip(")") for r in results for v in r.volatile})
    say("")
    say(f"mid-stage kills: {len(counted)} (" + ", ".join(f"{s} {c}" for s, c in per_stage.items())
        + f"); late kills (stage already published, not counted): {len(kills) - len(counted)}")
    groups = [r for r in counted if r.target == "flow group"]
    say(f"kill targets: flow group {len(groups)} ({sum(r.children_at_kill > 0 for r in groups)} "
        f"with a stage process running, which must die with the flow), stage child "
        f"{sum(r.target.startswith('stage child') for r in counted)}, flow only (no child) "
        f"{sum(r.target.startswith('flow only') for r in counted)}")
    say(f"reruns complete: {sum(r.rerun_ok for r in counted)}/{len(counted)}; identical to the "
        f"baseline: {sum(r.identical in ('hash', 'equal*') for r in counted)}/{len(counted)} "
        f"(by content_hash: {sum(r.identical == 'hash' for r in counted)}); partial artifacts "
        f"trusted: {sum(r.trusted_partial for r in results)}, reused: "
        f"{sum(r.partial_reused for r in results)}; orphaned stage processes: "
        f"{sum(len(r.orphans) for r in results)}; Prefect servers left by flow-only kills: "
        f"{sum(r.servers_left for r in results)}")
    for rule in volatile:
        say(f"  equal* allowed: {rule}: {RULE_WHY[rule]}")
    skipped = [r for r in results if r.problems == ["skipped"]]
    ran = [r for r in results if r not in skipped]
    passed = sum(r.passed for r in ran)
    say(f"drills passed: {passed}/{len(ran)}" + (f" ({len(skipped)} skipped)" if skipped else "")
        + f"; {time.monotonic() - started:.0f} s; logs under {harness.root / 'drills'}")
    return 0 if passed == len(ran) and not skipped else 1


if __name__ == "__main__":
    sys.exit(main())
