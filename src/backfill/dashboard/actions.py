"""What the dashboard does when asked to act on a migration (`POST
/api/migrations/{name}/{action}`): the options an action takes from its body, and the answer,
as the contract says: 202 with the migration's status JSON when accepted (`run` and `revert`
detached, `cancel`), 200 with the samples for `dry-run`, 409 with the one-sentence refusal (the
CLI's words). No HTTP here: the app turns an `Answer` into a response.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from backfill.cli.options import RECENT_SECONDS
from backfill.dashboard.background import Background, Started
from backfill.decision import OnError
from backfill.errors import BackfillError, DatabaseUnavailable, Refused, RowFailed
from backfill.history import Origin
from backfill.runner import Runner
from backfill.types import iso

# Actions the contract names that this version does not do yet: refused with a sentence.
LATER = ("tune", "hold", "release")


class BadOptions(ValueError):
    """A body the action cannot take (400): not an object, an unknown option, a bad value."""


def _positive(value: Any, from_form: bool) -> int | None:
    if from_form and isinstance(value, str):
        if not value.strip():
            return None
        value = int(value) if value.strip().isdigit() else value
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError("must be a whole number of at least 1")
    return value


_TRUE, _FALSE = ("true", "on", "1", "yes"), ("false", "off", "0", "no", "")


def _flag(value: Any, from_form: bool) -> bool:
    if from_form and isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _maybe(value: Any, from_form: bool) -> bool | None:
    if value is None or (from_form and value == ""):
        return None
    return _flag(value, from_form)


def _on_error(value: Any, _from_form: bool) -> str:
    if value not in [policy.value for policy in OnError]:
        raise ValueError("must be fail or skip")
    return str(value)


Parse = Callable[[Any, bool], Any]
# The options each action takes, by the CLI's option names with `_`.
OPTIONS: dict[str, dict[str, Parse]] = {
    "run": {
        "batch_size": _positive,
        "restart": _flag,
        "on_error": _on_error,
        "undo": _maybe,
        "no_backup_check": _flag,
    },
    "dry-run": {"batch_size": _positive, "dry_run_batches": _positive, "on_error": _on_error},
    "cancel": {},
    "revert": {"batch_size": _positive},
}


def options(action: str, body: bytes, form: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The options of `action` in a request's JSON `body`, or in its `form`'s fields (strings),
    without those left empty. BadOptions says what is wrong."""
    given: Any = form
    if form is None:
        try:
            given = json.loads(body) if body.strip() else {}
        except ValueError:
            raise BadOptions("the body is not JSON") from None
    if not isinstance(given, Mapping):
        raise BadOptions("the body must be a JSON object of options")
    taken = OPTIONS.get(action, {})
    found: dict[str, Any] = {}
    for key, value in given.items():
        if key not in taken:
            known = ", ".join(taken) or "none"
            raise BadOptions(f"{action} takes no option {key!r} (it takes: {known})")
        try:
            parsed = taken[key](value, form is not None)
        except ValueError as error:
            raise BadOptions(f"{key} {error}") from None
        if parsed is not None:
            found[key] = parsed
    return found


@dataclass(frozen=True)
class Answer:
    """An action's answer: the HTTP status, the JSON document, and the sentence the result page
    shows (a refusal's is the document's `error`)."""

    code: int
    document: dict[str, Any]
    sentence: str
    samples: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def refusal(cls, code: int, sentence: str) -> Answer:
        return cls(code, {"error": sentence}, sentence)


def answer_error(error: BackfillError) -> Answer:
    """A BackfillError as an answer: refusals 409, the database 503, a row a dry run failed on
    422 (the migration's function raised on it), anything else 500."""
    if isinstance(error, Refused):
        return Answer.refusal(409, str(error))
    if isinstance(error, DatabaseUnavailable):
        return Answer.refusal(503, str(error))
    if isinstance(error, RowFailed):
        return Answer.refusal(422, str(error))
    return Answer.refusal(500, str(error))


@dataclass(frozen=True)
class Actions:
    """The actions of one dashboard: `background` starts its detached children (None: it
    starts none); `production` asks for a recent backup before a run, as the CLI does."""

    background: Background | None
    production: bool

    def act(
        self, runner: Runner, name: str, action: str, given: dict[str, Any], origin: Origin
    ) -> Answer:
        """Do `action` on migration `name` with `given` options (checked by `options`), as
        asked from `origin`, through `runner` (whose history rows say that origin)."""
        if action in LATER:
            return Answer.refusal(
                409, f"{action} comes with a later version of backfill; nothing was changed"
            )
        try:
            if action == "dry-run":
                return self._dry_run(runner, name, given)
            if action == "cancel":
                return self._cancel(runner, name)
            if action == "run":
                if self.production and not given.get("no_backup_check"):
                    _refuse_without_recent_backup(runner, name)
                return self._detached(runner, "run", name, _run_arguments(given), origin)
            return self._detached(runner, "revert", name, _size(given), origin)
        except BackfillError as error:
            return answer_error(error)

    def _dry_run(self, runner: Runner, name: str, given: dict[str, Any]) -> Answer:
        [result] = runner.run(
            [name],
            dry_run=True,
            batch_size=given.get("batch_size"),
            dry_run_batches=given.get("dry_run_batches", 1),
            on_error=given.get("on_error", OnError.FAIL),
        )
        assert result.dry_run is not None
        report = result.dry_run.to_json()
        sentence = (
            f"{name}: a dry run of {report['batches']} batch(es) read {report['rows']:,} rows: "
            f"{report['would_change']:,} would change, {report['would_skip']:,} would be "
            f"skipped, {report['would_keep']:,} kept; nothing was saved"
        )
        return Answer(200, report, sentence, report["samples"])

    def _cancel(self, runner: Runner, name: str) -> Answer:
        if not runner.cancel(name):
            return Answer.refusal(409, f"{name}: no live run; nothing changed")
        sentence = f"{name}: cancel requested; the runner stops after its current batch"
        return Answer(202, _status(runner, name), sentence)

    def _detached(
        self, runner: Runner, verb: str, name: str, arguments: list[str], origin: Origin
    ) -> Answer:
        runner.migrations[name]
        if self.background is None:
            return Answer.refusal(409, f"this dashboard starts no {verb}s in the background")
        started = self.background.start(runner, verb, name, arguments, origin)
        return _started_answer(runner, verb, name, started)


def _started_answer(runner: Runner, verb: str, name: str, started: Started) -> Answer:
    where = f"pid {started.pid}, log {started.log}"
    if started.claimed:
        doing = "running" if verb == "run" else "reverting"
        return Answer(202, _status(runner, name), f"{name}: {doing} in the background ({where})")
    if started.code is None:  # still starting when the wait ran out: it goes on
        sentence = f"{name}: {verb} started in the background, not begun yet ({where})"
        return Answer(202, _status(runner, name), sentence)
    said = started.said or f"the background {verb} exited with code {started.code}"
    if started.code == 0:  # it had nothing to do (say, it had already succeeded)
        return Answer(200, _status(runner, name), said)
    # 2: refused (the CLI's exit 2, its sentence); 4: the database; else a bug of ours.
    return Answer.refusal({2: 409, 4: 503}.get(started.code, 500), said)


def _status(runner: Runner, name: str) -> dict[str, Any]:
    """The migration's status JSON, as `backfill status NAME --json` prints it."""
    return {name: runner.status([name])[name].to_json()}


def _size(given: Mapping[str, Any]) -> list[str]:
    size = given.get("batch_size")
    return [] if size is None else ["--batch-size", str(size)]


def _run_arguments(given: Mapping[str, Any]) -> list[str]:
    """As options of `backfill run` (the backup was checked here: `--no-backup-check`)."""
    arguments = [*_size(given), "--on-error", given.get("on_error", "fail"), "--no-backup-check"]
    if given.get("restart"):
        arguments.append("--restart")
    undo = given.get("undo")
    if undo is not None:
        arguments.append("--undo" if undo else "--no-undo")
    return arguments


def _refuse_without_recent_backup(runner: Runner, name: str) -> None:
    """In prod, a run whose tables have no backup from the last 24 hours is refused, as the
    CLI refuses it without a terminal; `no_backup_check` skips it."""
    latest = runner.status([name])[name].backup
    if latest is not None and runner.clock() - latest[1] <= RECENT_SECONDS:
        return
    told = "never backed up" if latest is None else f"last backed up at {iso(latest[1])}"
    raise Refused(
        f"{name}: no backup of its tables in the last 24 hours ({told}): take one with "
        f"`backfill backup {name}`, or ask again with no_backup_check"
    )
