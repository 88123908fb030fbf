"""`torchrun ... -m tests.train_ranks JOB.json`: the trainer on every rank, then each rank's
record of the CUDA call sites megatron-core made on this CPU box (`JOB.json.shims.rank<r>.json`),
so multi-process tests can check them too."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    from megatron_bridge import compat
    from megatron_bridge.training.job import TrainJob
    from megatron_bridge.training.trainer import run

    job = Path(sys.argv[1])
    run(TrainJob.read(job))
    rank = os.environ.get("RANK", "0")
    Path(f"{job}.shims.rank{rank}.json").write_text(json.dumps(dict(compat.REDIRECTS)))


if __name__ == "__main__":
    main()
