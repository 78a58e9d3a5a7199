"""Which database errors are transient: worth rolling a batch back and trying it again.

This module owns what the drivers say when that happens (SQLSTATEs, MySQL error numbers, the
attributes that carry them) and names the cause. How often and how long to wait is the policy's
(backfill.retry), which knows no dialect. Classified as transient:

| SQLSTATE | cause                                                               |
|----------|---------------------------------------------------------------------|
| 40001    | serialization failure                                               |
| 40P01    | deadlock detected                                                   |
| 55P03    | lock not available (our `lock_timeout`: the app held the rows)      |
| 57014    | query canceled *by our `statement_timeout`* (the batch size halves) |
| 57P01-03 | server shutting down, crashed, or starting up (a restart)           |
| 08xxx    | connection exceptions                                               |

MySQL and MariaDB drivers give error numbers instead:

| error | cause                                                                 |
|-------|-----------------------------------------------------------------------|
| 1213  | deadlock (InnoDB rolled the transaction back)                         |
| 1205  | lock wait timeout (our `innodb_lock_wait_timeout`)                    |
| 1969  | MariaDB's `max_statement_time` exceeded (the batch size halves)       |
| 3024  | MySQL's `max_execution_time` exceeded (the batch size halves)         |
| 1053  | server shutting down                                                  |
| 1927, 2003, 2006, 2013, 4031 | connection killed, refused, gone away, lost, timed out |

plus a connection the driver reports lost or closed (`pg_terminate_backend`, a restart, a network
failure); the batch's connection is then replaced. Anything else (a row the function rejects, a
constraint violation, a lease lost) is not transient.

The classification is pure: the caller says which exceptions come from the database at all and
which mean a lost connection (`Database.is_database_error`, `Database.is_disconnect`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

SERIALIZATION_FAILURE = "serialization failure"
DEADLOCK = "deadlock"
LOCK_TIMEOUT = "lock timeout"
STATEMENT_TIMEOUT = "statement timeout"
SERVER_RESTART = "server restart"
CONNECTION_LOST = "connection lost"

_BY_SQLSTATE = {
    "40001": SERIALIZATION_FAILURE,
    "40P01": DEADLOCK,
    "55P03": LOCK_TIMEOUT,
    "57014": STATEMENT_TIMEOUT,
    "57P01": SERVER_RESTART,  # admin_shutdown: also what pg_terminate_backend sends
    "57P02": SERVER_RESTART,  # crash_shutdown
    "57P03": SERVER_RESTART,  # cannot_connect_now: starting up or shutting down
}
_BY_MYSQL_ERROR = {
    1213: DEADLOCK,  # ER_LOCK_DEADLOCK
    1205: LOCK_TIMEOUT,  # ER_LOCK_WAIT_TIMEOUT
    1969: STATEMENT_TIMEOUT,  # ER_STATEMENT_TIMEOUT (MariaDB)
    3024: STATEMENT_TIMEOUT,  # ER_QUERY_TIMEOUT (MySQL)
    1053: SERVER_RESTART,  # ER_SERVER_SHUTDOWN
    1927: CONNECTION_LOST,  # ER_CONNECTION_KILLED (MariaDB: KILL, or a shutdown)
    2003: CONNECTION_LOST,  # CR_CONN_HOST_ERROR: refused while the server restarts
    2006: CONNECTION_LOST,  # CR_SERVER_GONE_ERROR
    2013: CONNECTION_LOST,  # CR_SERVER_LOST
    4031: CONNECTION_LOST,  # ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8)
}
_RECONNECT = frozenset({SERVER_RESTART, CONNECTION_LOST})
# How many errors deep to look: a rollback that fails on a dead connection raises its own error,
# with the one that killed the batch as its context.
_CHAIN_DEPTH = 4


@dataclass(frozen=True)
class Transient:
    """Why a batch failed in a way worth trying again."""

    cause: str  # one of the names above
    sqlstate: str | None  # or, from MySQL's drivers, the error number
    error_type: str  # the driver's exception class, e.g. LockNotAvailable
    message: str  # the driver's first line

    @property
    def reconnect(self) -> bool:
        """The connection is gone (or going): the next try needs a new one."""
        return self.cause in _RECONNECT

    @property
    def shrink(self) -> bool:
        """The batch took longer than the statement timeout allows: try a smaller one."""
        return self.cause == STATEMENT_TIMEOUT

    def describe(self) -> str:
        code = f" ({self.sqlstate})" if self.sqlstate else ""
        return f"{self.cause}{code}: {self.message}"


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE a driver error carries (psycopg 3 `sqlstate`, psycopg2 `pgcode`)."""
    for attribute in ("sqlstate", "pgcode"):
        value = getattr(error, attribute, None)
        if isinstance(value, str) and value:
            return value
    return None


def mysql_errno(error: BaseException) -> int | None:
    """The error number a MySQL driver's error carries first in its args (PyMySQL, mysqlclient;
    0 for its own client-side errors, which is no number); PostgreSQL's and SQLite's drivers put
    text there."""
    args = getattr(error, "args", ())
    number = args[0] if args else None
    if isinstance(number, int) and not isinstance(number, bool) and number > 0:
        return number
    return None


def driver_error(error: BaseException) -> BaseException:
    """The driver's own exception under SQLAlchemy's wrapper, if any."""
    if isinstance(error, sa.exc.DBAPIError) and error.orig is not None:
        return error.orig
    return error


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def classify(
    error: BaseException,
    *,
    is_database_error: Callable[[BaseException], bool],
    is_disconnect: Callable[[BaseException], bool] = lambda _error: False,
) -> Transient | None:
    """A Transient when `error` (or the error it was raised while handling) is worth a retry.

    `is_database_error` says which exceptions come from the database at all (SQLAlchemy's
    wrappers, the driver's own classes): only those are looked at, so an error in the user's
    function is never retried. `is_disconnect` recognises, for the dialect at hand, a driver
    error that means the connection is lost. Of several in the chain, the deepest (the first
    raised: what killed the batch, not a rollback that failed after it) names the cause."""
    seen = 0
    found: Transient | None = None
    current: BaseException | None = error
    while current is not None and seen < _CHAIN_DEPTH and is_database_error(current):
        found = _one(current, is_disconnect) or found
        seen += 1
        current = current.__cause__ or current.__context__
    return found


def _one(error: BaseException, is_disconnect: Callable[[BaseException], bool]) -> Transient | None:
    orig = driver_error(error)
    message = first_line(orig)
    # MySQL's SQLSTATEs are coarse (HY000 for most, 40001 for a deadlock): its number decides.
    number = mysql_errno(orig)
    code = sqlstate(orig)
    if number is not None:
        code, cause = str(number), _BY_MYSQL_ERROR.get(number)
        text = str(orig.args[1]).strip() if len(orig.args) > 1 else ""
        if text:
            message = text.splitlines()[0]  # without the number: that is `code`
    else:
        cause = _BY_SQLSTATE.get(code or "")
    if cause is None and code is not None and code.startswith("08"):
        cause = CONNECTION_LOST
    if cause == STATEMENT_TIMEOUT and number is None and "statement timeout" not in message:
        cause = None  # canceled by someone (pg_cancel_backend): not ours to retry
    if cause is None and (
        (isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated)
        or is_disconnect(orig)
    ):
        cause = CONNECTION_LOST
    if cause is None:
        return None
    return Transient(cause, code, type(orig).__name__, message)
