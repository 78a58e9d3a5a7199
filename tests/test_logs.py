"""`--log-format json`: a run's events and the `backfill` logger's records as one stream of JSON
lines, parsed back and checked."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import sqlalchemy as sa

from apps import counting
from backfill import Refused, Runner
from backfill.cli import render
from backfill.cli.observe import log_format_of, observed, passed_on
from backfill.events import Event
from backfill.logs import JsonFormatter, JsonLog, json_logs, plain_warnings
from support import cli_env, counting_url

NAME = counting.NAME
ROWS = 250
BATCH = 100
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = counting_url(tmp_path, "logs.db", ROWS)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE items SET source = 'bad:x' WHERE id = 150"))
    engine.dispose()
    return url


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(url: str, listener: JsonLog, *more: Any) -> None:
    runner = Runner(url, counting.migrations, listeners=[listener, *more])
    [result] = runner.run([NAME], batch_size=BATCH)
    runner.db.dispose()
    assert str(result.state) == "failed"


def test_a_failed_run_is_its_events_and_a_record_of_its_failure(url: str, tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with json_logs(path) as listener:
        run(url, listener)

    written = lines(path)
    assert all(ISO_MS.match(line["time"]) for line in written)
    assert [line["event"] for line in written] == [
        "state", "run_started", "batch", "error", "log", "state", "run_finished", "log",
    ]  # fmt: skip
    state, started, batch, error, failure, failed, finished, ended = written
    assert (state["from"], state["to"]) == ("pending", "inProgress")
    assert (started["migration"], started["total"]) == (NAME, ROWS)
    assert (batch["first_key"], batch["last_key"], batch["rows_changed"]) == (1, 100, 100)
    assert (error["row_id"], error["field"], error["type"]) == (150, "source", "BadValue")
    assert failure == failure | {
        "level": "ERROR",
        "logger": "backfill.run",
        "migration": NAME,
        "row_id": 150,
        "field": "source",
        "error_type": "BadValue",
    }
    assert failure["message"] == (
        "migration 'derive' failed at row 150 (source): BadValue: is marked bad"
    )
    assert (failed["to"], finished["state"], finished["exit_code"]) == ("failed", "failed", 1)
    assert ended | {"time": None} == {
        "event": "log",
        "time": None,
        "level": "ERROR",
        "logger": "backfill.run",
        "message": "migration 'derive' ended failed (exit code 1)",
        "migration": NAME,
    }


def test_the_engine_logs_a_failed_run_with_no_listener_at_all(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Through the Python API, with nothing listening: the application's logging hears of it.
    caplog.set_level(logging.INFO, logger="backfill")
    runner = Runner(url, counting.migrations)
    [result] = runner.run([NAME], batch_size=BATCH)
    runner.db.dispose()
    assert str(result.state) == "failed"
    failure, ended = [r for r in caplog.records if r.name == "backfill.run"]
    assert (failure.levelname, failure.__dict__["row_id"], failure.__dict__["field"]) == (
        "ERROR", 150, "source",
    )  # fmt: skip
    assert failure.getMessage().startswith("migration 'derive' failed at row 150 (source)")
    assert ended.getMessage() == "migration 'derive' ended failed (exit code 1)"


def test_plain_warnings_are_bare_lines_on_stderr_until_json_takes_over(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    logger = logging.getLogger("backfill")
    with plain_warnings():
        logger.info("not shown: below a warning")
        logger.warning("the database went away; retrying")
        logging.getLogger("backfill.run").error("said by the command itself")
        with json_logs(tmp_path / "run.jsonl"):
            logger.warning("in the JSON file only")
    logger.warning("after: not ours to print")
    assert capsys.readouterr().err == "the database went away; retrying\n"
    [record] = lines(tmp_path / "run.jsonl")
    assert record["message"] == "in the JSON file only"


def test_a_failed_run_in_text_says_so_once(url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "backfill", "--app", "apps.counting:migrations",
         "--database-url", url, "run", NAME, "--batch-size", str(BATCH)],
        capture_output=True, text=True, env=cli_env(), timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    said = "backfill: migration 'derive' failed on row 150, field 'source': is marked bad\n"
    assert done.stderr.endswith(said)
    assert "failed at row 150" not in done.stderr  # the record's words: not printed too


def test_a_listener_that_raises_is_a_record_with_its_traceback(url: str, tmp_path: Path) -> None:
    def broken(event: Event) -> None:
        if event.event == "batch":
            raise OSError("disk full")

    path = tmp_path / "run.jsonl"
    with json_logs(path) as listener:
        run(url, listener, broken)

    [record] = [line for line in lines(path) if line.get("logger") == "backfill"]
    assert record["level"] == "ERROR"
    assert record["message"] == "backfill: an event listener failed on a batch event"
    assert record["exception"].startswith("Traceback")
    assert "OSError: disk full" in record["exception"]


def test_the_handler_is_gone_after_and_the_file_is_appended_to(tmp_path: Path) -> None:
    logger = logging.getLogger("backfill")
    before = (list(logger.handlers), logger.level)
    path = tmp_path / "run.jsonl"
    path.write_text('{"event": "earlier"}\n', encoding="utf-8")
    with json_logs(path):
        logger.info("inside")
        logging.getLogger("backfill.store").debug("below INFO: not written")
        logging.getLogger("elsewhere").error("not ours: not written")
    logger.warning("outside: not written")
    assert (list(logger.handlers), logger.level) == before
    assert [(line["event"], line.get("message")) for line in lines(path)] == [
        ("earlier", None),
        ("log", "inside"),
    ]


def test_the_formatter_writes_one_line_with_the_extras_and_the_exception() -> None:
    try:
        raise ValueError("no\nway")
    except ValueError:
        record = logging.getLogger("backfill").makeRecord(
            "backfill",
            logging.WARNING,
            __file__,
            1,
            "row %s of %r",
            (7, "derive"),
            sys.exc_info(),
            extra={"migration": "derive", "row_id": (7, "a"), "field": "source"},
        )
    record.created = 0.25
    text = JsonFormatter().format(record)

    assert "\n" not in text
    document = json.loads(text)
    exception = document.pop("exception")
    assert document == {
        "event": "log",
        "time": "1970-01-01T00:00:00.250Z",
        "level": "WARNING",
        "logger": "backfill",
        "message": "row 7 of 'derive'",
        "migration": "derive",
        "row_id": [7, "a"],
        "field": "source",
    }
    assert exception.startswith("Traceback") and exception.endswith("ValueError: no\nway")


def test_a_record_without_extras_has_only_the_common_keys() -> None:
    record = logging.makeLogRecord({"name": "backfill", "levelname": "INFO", "msg": "hello"})
    assert set(json.loads(JsonFormatter().format(record))) == {
        "event",
        "time",
        "level",
        "logger",
        "message",
    }


@pytest.fixture
def no_integrations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither Sentry nor OpenTelemetry asked for by the environment."""
    import os

    for name in list(os.environ):
        if name.startswith(("OTEL_", "SENTRY_")):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("no_integrations")
def test_observed_text_adds_nothing() -> None:
    logger = logging.getLogger("backfill")
    before = list(logger.handlers)
    with observed(None, None) as listeners:
        assert listeners == []
        assert logger.handlers == before and not render.err.quiet


@pytest.mark.usefixtures("no_integrations")
def test_observed_json_to_stderr_keeps_rich_off_it(capsys: pytest.CaptureFixture[str]) -> None:
    with observed("json", None) as [listener]:
        assert render.err.quiet
        render.err.print("a message for people")
        logging.getLogger("backfill").warning("for machines")
    assert not render.err.quiet
    [line] = capsys.readouterr().err.splitlines()
    assert json.loads(line)["message"] == "for machines"
    assert isinstance(listener, JsonLog)


@pytest.mark.usefixtures("no_integrations")
def test_observed_logs_the_error_leaving_it(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with pytest.raises(Refused), observed(None, str(path)):
        raise Refused("derive: a gate is closed")
    [record] = lines(path)
    assert (record["level"], record["logger"], record["message"], record["error_type"]) == (
        "WARNING",
        "backfill.run",
        "backfill: derive: a gate is closed",
        "Refused",
    )


def test_log_file_means_json_and_is_passed_on_to_children(tmp_path: Path) -> None:
    assert log_format_of(None, None) == "text"
    assert log_format_of(None, "x.jsonl") == "json"
    with pytest.raises(click.UsageError):
        log_format_of("text", "x.jsonl")
    assert passed_on(None, None) == []
    assert passed_on("json", None) == ["--log-format", "json"]
    assert passed_on(None, "x.jsonl") == [
        "--log-format",
        "json",
        "--log-file",
        str(Path("x.jsonl").absolute()),
    ]


def test_importing_backfill_imports_neither_sentry_nor_opentelemetry() -> None:
    code = (
        "import sys, backfill, backfill.logs, backfill.cli.observe\n"
        "import backfill.integrations.sentry, backfill.integrations.otel\n"
        "loaded = [m for m in sys.modules if m.startswith(('sentry_sdk', 'opentelemetry'))]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
