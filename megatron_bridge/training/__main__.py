"""`python -m megatron_bridge.training JOB.json` (one process, or every rank under torchrun).
A user mistake prints `error: <one line>` on rank 0 and exits 2, before any training step."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from megatron_bridge.checkpoint import CheckpointError
    from megatron_bridge.training.job import JobError, TrainJob
    from megatron_bridge.training.trainer import run

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m megatron_bridge.training JOB.json", file=sys.stderr)
        return 2
    try:
        run(TrainJob.read(Path(args[0])))
    except (JobError, CheckpointError, FileNotFoundError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
