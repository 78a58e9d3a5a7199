"""The `sentry` and `otel` extras: a failed run reported to Sentry with its tags (through a
transport that keeps what it is given: no network), and one OpenTelemetry span per batch (into
the SDK's in-memory exporter)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The extras are in `dev`: the tests import them as they are (they never skip).
import sentry_sdk
import sqlalchemy as sa
from opentelemetry.sdk.resources import SERVICE_NAME
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sentry_sdk.envelope import Envelope
from sentry_sdk.integrations.logging import LoggingIntegration, unignore_logger
from sentry_sdk.transport import Transport

from apps import counting
from backfill import Runner
from backfill.events import BatchCommitted, Event
from backfill.integrations import otel, sentry
from backfill.logs import RUN_LOGGER, json_logs
from support import counting_url

NAME = counting.NAME
ROWS = 250
BATCH = 100


@pytest.fixture
def url(tmp_path: Path) -> str:
    return counting_url(tmp_path, "observed.db", ROWS)


def mark_bad(url: str, row: int) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE items SET source = 'bad:x' WHERE id = :id"), {"id": row})
    engine.dispose()


def run(url: str, *listeners: Any) -> str:
    runner = Runner(url, counting.migrations, listeners=listeners)
    [result] = runner.run([NAME], batch_size=BATCH)
    runner.db.dispose()
    return str(result.state)


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("OTEL_", "SENTRY_")):
            monkeypatch.delenv(name)


# -- Sentry --------------------------------------------------------------------------------------


class Kept(Transport):
    """A transport that keeps each envelope rather than sending it."""

    def __init__(self) -> None:
        super().__init__()
        self.envelopes: list[Envelope] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)

    def events(self) -> list[dict[str, Any]]:
        return [
            item.payload.json
            for envelope in self.envelopes
            for item in envelope.items
            if item.type == "event" and item.payload.json is not None
        ]


@pytest.fixture
def sent() -> Iterator[Kept]:
    """The SDK initialised with a transport that keeps what it sends; closed and reset after."""
    transport = Kept()
    sentry_sdk.init(
        dsn="https://key@example.invalid/1", transport=transport, default_integrations=False
    )
    yield transport
    sentry_sdk.get_client().close()
    sentry_sdk.get_global_scope().set_client(None)
    unignore_logger(RUN_LOGGER)


def test_a_failed_run_sends_one_event_with_its_tags(url: str, sent: Kept) -> None:
    mark_bad(url, 150)
    listener = sentry.sentry_listener()
    assert run(url, listener) == "failed"
    listener.flush()

    [event] = sent.events()
    assert event["level"] == "error"
    assert event["message"] == "backfill: derive failed: BadValue on source: is marked bad"
    assert event["tags"] == {
        "migration": NAME,
        "row_id": "150",
        "field": "source",
        "error_type": "BadValue",
    }
    assert event["fingerprint"] == ["backfill", NAME, "BadValue", "source"]
    assert event["contexts"]["backfill"]["row_id"] == 150


def test_a_successful_run_sends_nothing(url: str, sent: Kept) -> None:
    listener = sentry.sentry_listener()
    assert run(url, listener) == "success"
    listener.flush()
    assert sent.events() == []


def test_a_run_that_ends_failed_without_a_row_sends_its_end(sent: Kept) -> None:
    from backfill.events import RunFinished, RunStarted

    listener = sentry.sentry_listener()
    listener(RunStarted(NAME, 1.0, run_id=1))
    listener(RunFinished(NAME, 2.0, state=None, exit_code=4, run_id=1))
    listener(RunFinished(NAME, 3.0, state="canceled", exit_code=3, run_id=2))
    listener.flush()
    [event] = sent.events()
    assert event["tags"] == {"migration": NAME, "exit_code": "4"}


@pytest.mark.usefixtures("clean_environment")
def test_sentry_is_enabled_only_by_its_dsn(monkeypatch: pytest.MonkeyPatch, sent: Kept) -> None:
    assert sentry.enable_from_environment() is None
    monkeypatch.setenv("SENTRY_DSN", "https://key@example.invalid/1")
    # Initialised already (here with the test transport): kept as it is, not initialised again.
    listener = sentry.enable_from_environment()
    assert isinstance(listener, sentry.RunFailures)
    assert sentry_sdk.get_client().transport is sent


def test_the_failure_record_is_not_sent_twice_through_logging(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Sentry's logging integration on, the JSON logs' failure record is left out: the
    listener's event (with its tags) is the one report."""
    transport = Kept()
    sentry_sdk.init(
        dsn="https://key@example.invalid/1",
        transport=transport,
        default_integrations=False,
        integrations=[LoggingIntegration()],  # ERROR records become events
    )
    try:
        monkeypatch.setenv("SENTRY_DSN", "https://key@example.invalid/1")
        listener = sentry.enable_from_environment()
        assert listener is not None
        mark_bad(url, 150)
        with json_logs(tmp_path / "run.jsonl") as logs:
            assert run(url, logs, listener) == "failed"
        listener.flush()
        assert [e["tags"].get("row_id") for e in transport.events()] == ["150"]
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)
        unignore_logger(RUN_LOGGER)


# -- OpenTelemetry -------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A provider of our own (the global one is left alone) exporting into memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def test_each_batch_is_one_span_as_long_as_the_batch(
    url: str, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    batches: list[BatchCommitted] = []

    def keep(event: Event) -> None:
        if isinstance(event, BatchCommitted):
            batches.append(event)

    assert run(url, otel.otel_listener(provider), keep) == "success"

    finished = exporter.get_finished_spans()
    assert len(finished) == len(batches) == 3
    for span, batch in zip(finished, batches, strict=True):
        assert span.name == "backfill.batch"
        assert dict(span.attributes or {}) == {
            "migration": NAME,
            "first_key": str(batch.first_key),
            "last_key": str(batch.last_key),
            "rows_read": batch.rows_read,
            "rows_changed": batch.rows_changed,
            "batch_size": BATCH,
        }
        assert span.start_time is not None and span.end_time is not None
        assert (span.end_time - span.start_time) / 1e9 == pytest.approx(batch.seconds, abs=1e-6)
        assert span.end_time / 1e9 == pytest.approx(batch.time, abs=1e-6)
    assert [(s.attributes or {})["first_key"] for s in finished] == ["1", "101", "201"]


def test_a_shard_and_a_composite_key_are_attributes_too(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    otel.otel_listener(provider)(BatchCommitted(NAME, 100.0, 2, [1, "a"], [9, "z"], 10, 4, 0.5, 10))
    [span] = exporter.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert (attributes["shard"], attributes["first_key"], attributes["last_key"]) == (
        2,
        '[1, "a"]',
        '[9, "z"]',
    )
    assert (span.start_time, span.end_time) == (99_500_000_000, 100_000_000_000)


@pytest.mark.usefixtures("clean_environment")
def test_otel_is_enabled_by_its_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert otel.enable_from_environment() is None

    monkeypatch.setenv("OTEL_SERVICE_NAME", "nightly-backfill")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    listener = otel.enable_from_environment()
    assert listener is not None
    provider = listener.provider
    assert isinstance(provider, TracerProvider)
    assert provider.resource.attributes[SERVICE_NAME] == "nightly-backfill"
    provider.shutdown()

    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert otel.enable_from_environment() is None


@pytest.mark.usefixtures("clean_environment")
def test_an_exporter_not_installed_is_said_and_left_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "no-such-exporter")
    with caplog.at_level(logging.WARNING, logger="backfill"):
        listener = otel.enable_from_environment()
    assert listener is not None
    assert isinstance(listener.provider, TracerProvider)
    assert listener.provider.resource.attributes[SERVICE_NAME] == "backfill"
    assert "'no-such-exporter', which is not installed" in caplog.text
    listener.provider.shutdown()
