"""The one exception type for mistakes a user fixes (bad settings, missing files, wrong input), and
the one protocol that carries it out of a child process.

Raised anywhere (settings, megatron_bridge, a stage), it reaches the user once: a stage's task turns
it into a Failed state with the message (prefixed with the stage's name there, and only there); the
CLI prints that message as one line and exits 2. A child process (the trainer's ranks, the bridge,
lighteval) reports it as one `error: <message>` line on stderr and exit status 2
(`exit_on_user_error`); the parent turns that line back into a UserError (`reported_error`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

PREFIX = "error: "
EXIT_STATUS = 2
"""Exit status of a process that stopped on a user mistake (the CLI's too)."""


class UserError(ValueError):
    """A problem in the user's input, with a message that says how to fix it (one line)."""


def exit_on_user_error(main: Callable[[], object]) -> int:
    """Run a child process's work: 0 when it returns; on a UserError, print `error: …` and return
    2. Every rank of a torchrun job prints it: torchrun kills the other ranks as soon as one
    exits, so rank 0 alone might never get to say it (the parent reads the last one)."""
    try:
        main()
    except UserError as e:
        print(f"{PREFIX}{e}", file=sys.stderr, flush=True)
        return EXIT_STATUS
    return 0


def reported_error(lines: Iterable[str]) -> str | None:
    """The user mistake a child process reported among its output lines (its last `error: …`),
    or None."""
    found = None
    for line in lines:
        if PREFIX in line:
            found = line.split(PREFIX, 1)[1].strip()
    return found
