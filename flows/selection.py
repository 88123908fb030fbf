"""Which stages a run executes, reuses or leaves out (`--from/--only/--until/--force`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from settings.errors import UserError
from tasks import BY_NAME, STAGE_NAMES

ALL = "all"


@dataclass(frozen=True)
class Selection:
    """`from_stage`: rerun that stage and everything downstream (forced). `only`: run just these
    stages. `until`: stop after this stage. `force`: rebuild these stages even if cached (their
    downstream then rebuilds only if the output changed)."""

    from_stage: str | None = None
    only: list[str] = field(default_factory=list)
    until: str | None = None
    force: list[str] = field(default_factory=list)


def _check(names: list[str], option: str) -> None:
    for n in names:
        if n not in BY_NAME and not (option == "--force" and n == ALL):
            raise UserError(f"{option} {n}: no such stage; stages: {', '.join(STAGE_NAMES)}")


def ancestors(name: str) -> set[str]:
    out: set[str] = set()
    for u in BY_NAME[name].upstream:
        out |= {u} | ancestors(u)
    return out


def descendants(name: str) -> set[str]:
    return {n for n in STAGE_NAMES if name in ancestors(n)}


def resolve(sel: Selection) -> dict[str, str]:
    """Stage → `run`, `force` (run, ignoring caches) or `reuse` (must already exist), in DAG
    order; stages a run does not need are left out."""
    _check([sel.from_stage] if sel.from_stage else [], "--from")
    _check([sel.until] if sel.until else [], "--until")
    _check(sel.only, "--only")
    _check(sel.force, "--force")
    if sel.only and sel.from_stage:
        raise UserError("--only and --from cannot be combined: --only runs just the named stages")
    run = set(STAGE_NAMES)
    if sel.only:
        run = set(sel.only)
    if sel.from_stage:
        run = {sel.from_stage} | descendants(sel.from_stage)
    if sel.until:
        run &= {sel.until} | ancestors(sel.until)
        if not run:
            raise UserError(f"--until {sel.until} leaves nothing to run after --from {sel.from_stage}")
    forced = set(STAGE_NAMES) if ALL in sel.force else set(sel.force)
    if sel.from_stage:
        forced |= run
    if ALL not in sel.force and (stray := forced - run):
        raise UserError(f"--force {', '.join(sorted(stray))}: not among the stages this run "
                        "executes; drop --only/--from/--until or the --force")
    needed = run | {a for n in run for a in ancestors(n)}
    return {n: ("force" if n in forced else "run") if n in run else "reuse"
            for n in STAGE_NAMES if n in needed}
