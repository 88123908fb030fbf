"""How much a fully cached `rsft run` costs next to an empty Prefect flow.

Both run as fresh processes against their own ephemeral Prefect API (what a user pays per
command). Target: cached rerun ≤ empty flow + 3 s.

    python benchmarks/cached_rerun.py [--repeats 3] [--preset tiny]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EMPTY_FLOW = "from prefect import flow\nflow(name='empty')(lambda: None)()\n"


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return elapsed, proc.stdout + proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="rsft-bench-") as tmp:
        tmp_path = Path(tmp)
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "DO_NOT_TRACK": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
        env.pop("PREFECT_API_URL", None)
        rsft = [sys.executable, "-m", "flows.cli", "run", args.preset,
                "--set", f"workdir={tmp_path / 'work'}"]
        cwd = Path(__file__).resolve().parents[1]
        first, _ = timed(rsft, env, cwd)  # builds every stage (and migrates the database)
        print(f"first run (builds everything): {first:.1f} s")

        empty, cached = [], []
        for _ in range(args.repeats):
            empty.append(timed([sys.executable, "-c", EMPTY_FLOW], env, cwd)[0])
            seconds, log = timed(rsft, env, cwd)
            finished = log.count("Finished in state ")
            cached_stages = log.count("Finished in state Cached")
            if cached_stages != finished - 1:  # every task Cached; the flow itself Completed
                sys.exit(f"rerun was not fully cached ({cached_stages} of {finished - 1}):\n{log}")
            cached.append(seconds)

    e, c = statistics.median(empty), statistics.median(cached)
    print(f"{'':28}{'median':>8}  runs")
    print(f"{'empty Prefect flow':28}{e:7.2f}s  " + " ".join(f"{x:.2f}" for x in empty))
    print(f"{'cached rsft run':28}{c:7.2f}s  " + " ".join(f"{x:.2f}" for x in cached))
    print(f"ratio cached/empty = {c / e:.2f}; difference = {c - e:+.2f} s "
          f"({'within' if c - e <= 3 else 'OVER'} the 3 s budget)")


if __name__ == "__main__":
    main()
