"""Node 0's output as every launcher sees it, and how a training run ended.

The local and Slurm launchers read node 0's stdout; the Kubernetes launcher reads the master pod's
log stream. Either way each line goes through one `AgentWatch`: into `train.log`, to the Prefect
log if the trainer printed it (`step …`, `training: …`), and checked for the user mistake the
trainer reports (`settings.errors.reported_error`). At the end `result` turns how the agents ended
into the stage's outcome. Progress is not read from these lines but from the trainer's
`metrics.jsonl` (`latest_metrics`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from settings.errors import UserError, reported_error

TRAINER_LINES = ("step ", "training:")  # what the trainer prints, on global rank 0 only
TAIL_LINES = 30  # of train.log, in the message of a failed run


class AgentWatch:
    """train.log, the forwarded trainer lines, the reported mistake and the deadline of one run
    (`timeout` seconds from now). A context manager: train.log stays open while it runs."""

    def __init__(self, log_path: Path, timeout: float, log):
        self.log_path, self.timeout, self.log = log_path, timeout, log
        self.deadline = time.monotonic() + timeout
        self.error: str | None = None  # the trainer's last reported mistake
        self._file = open(log_path, "a")

    def __enter__(self) -> AgentWatch:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def note(self, text: str) -> None:
        """A launcher's own line (what it started) in train.log."""
        self._write(text)

    def line(self, line: str) -> None:
        """One line of node 0's output."""
        self._write(line)
        text = line.rstrip()
        if text.startswith(TRAINER_LINES):
            self.log.info("train: %s", text)
        self.error = reported_error([text]) or self.error

    def follow(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.line(line)

    def remaining(self) -> float:
        """Seconds left before the deadline (negative past it)."""
        return self.deadline - time.monotonic()

    def result(self, failure: str | None) -> None:
        """Return if the agents succeeded (`failure` is None). Otherwise raise: a failure past the
        deadline is the timeout (the launcher killed the run), else the trainer's reported mistake
        is a UserError, else a RuntimeError with `failure` and the end of train.log."""
        if failure is None:
            return
        if self.remaining() <= 0:
            raise UserError(f"timed out after {self.timeout / 60:.0f} min "
                            "(train.timeout_minutes); rerun to resume from the latest checkpoint")
        if self.error is not None:
            raise UserError(self.error)
        self._file.flush()
        lines = self.log_path.read_text(errors="replace").splitlines(keepends=True)
        raise RuntimeError(f"training failed ({failure}); see {self.log_path}:\n"
                           + "".join(lines[-TAIL_LINES:]))

    def _write(self, line: str) -> None:
        self._file.write(line if line.endswith("\n") else line + "\n")
        self._file.flush()


def recent_metrics(path: Path, count: int) -> list[dict[str, Any]]:
    """The trainer's last `count` complete records in metrics.jsonl, oldest first ([] before its
    first step). Only lines ending in a newline count: the trainer may be writing the next one."""
    try:
        with open(path, "rb") as f:
            start = max(0, f.seek(0, os.SEEK_END) - 1024 * (count + 1))  # a record is far shorter
            f.seek(start)
            lines = f.read().split(b"\n")[:-1]
    except FileNotFoundError:
        return []
    if start:  # the first line read may be the end of a record
        lines = lines[1:]
    return [json.loads(line) for line in lines[-count:]]


def latest_metrics(path: Path) -> dict[str, Any] | None:
    """The trainer's last complete record in metrics.jsonl (None before its first step)."""
    records = recent_metrics(path, 1)
    return records[-1] if records else None
