"""The gate of a migration that requires another (`Prerequisite`): it may run only once the one
it requires has succeeded, long enough ago, and (when asked) `verify` finds nothing left of it.
The cleanup of the flagship waits a week after its backfill this way."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from backfill.definition import Migration
from backfill.errors import GateClosed
from backfill.progress import MigrationStatus
from backfill.state import State
from backfill.verification import Verification


def check(
    migration: Migration,
    min_age: timedelta | None,
    *,
    now: float,
    status: Callable[[str], MigrationStatus],
    verify: Callable[[str], Verification],
) -> None:
    """GateClosed, in one sentence, unless `migration` may run now; `min_age` overrides the
    prerequisite's wait."""
    prerequisite = migration.requires
    if prerequisite is None:
        return
    before = prerequisite.migration
    wait = prerequisite.min_age if min_age is None else min_age
    found = status(before)
    if found.state is not State.SUCCESS or found.finished_at is None:
        raise GateClosed(
            f"migration {migration.name!r} requires {before!r} to have finished with "
            f"success; it is {found.state}"
        )
    age = timedelta(seconds=now - found.finished_at)
    if age < wait:
        raise GateClosed(
            f"migration {migration.name!r} may run only {wait} after {before!r} succeeded; "
            f"it succeeded {_rounded(age)} ago (use --min-age to change the wait, "
            "--force to skip this check)"
        )
    if prerequisite.verified:
        checked = verify(before)
        if not checked.clean:
            raise GateClosed(
                f"migration {migration.name!r} requires `verify {before}` to find nothing "
                f"left; it finds {checked.remaining} rows left and {checked.raising} that raise"
            )


def _rounded(age: timedelta) -> timedelta:
    return timedelta(seconds=round(age.total_seconds()))
