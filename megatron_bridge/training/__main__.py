"""`python -m megatron_bridge.training JOB.json` (one process, or every rank under torchrun).
A user mistake prints `error: <one line>` (on every rank) and exits 2, before any training step."""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from megatron_bridge.training.job import TrainJob
    from megatron_bridge.training.trainer import run
    from settings.errors import exit_on_user_error

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m megatron_bridge.training JOB.json", file=sys.stderr)
        return 2
    return exit_on_user_error(lambda: run(TrainJob.read(Path(args[0]))))


if __name__ == "__main__":
    sys.exit(main())
