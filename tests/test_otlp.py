"""The `otel` extra as a user points it at a collector: `backfill run` with only the standard
`OTEL_*` variables sends one `backfill.batch` span per batch over OTLP (HTTP, protobuf) to a
collector on loopback, here a small HTTP server decoding what it is sent with OpenTelemetry's
own protobuf classes."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from apps.counting import NAME
from support import cli_env, counting_url

ROWS = 50
BATCH = 10


class Collector(ThreadingHTTPServer):
    """Keeps each trace export it is sent (POST /v1/traces), answering 200."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.exports: list[ExportTraceServiceRequest] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/v1/traces":
            export = ExportTraceServiceRequest()
            export.ParseFromString(body)
            self.server.exports.append(export)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_run_sends_a_span_per_batch_to_the_collector_otel_names(
    collector: Collector, tmp_path: Path
) -> None:
    url = counting_url(tmp_path, "items.db", ROWS)
    env = cli_env(
        BACKFILL_APP="apps.counting:migrations",
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
        OTEL_SERVICE_NAME="nightly-backfill",
    )  # OTEL_TRACES_EXPORTER unset: otlp, the standard default
    done = subprocess.run(
        [sys.executable, "-m", "backfill", "--database-url", url, "run", NAME,
         "--batch-size", str(BATCH)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    spans = [
        (resource, span)
        for export in collector.exports
        for resource in export.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    assert spans, done.stderr
    services = {
        attribute.value.string_value
        for resource, _span in spans
        for attribute in resource.resource.attributes
        if attribute.key == "service.name"
    }
    assert services == {"nightly-backfill"}
    read, firsts = 0, []
    for _resource, span in spans:
        attributes = {a.key: a.value for a in span.attributes}
        assert span.name == "backfill.batch"
        assert attributes["migration"].string_value == NAME
        assert span.end_time_unix_nano > span.start_time_unix_nano
        read += attributes["rows_read"].int_value
        if attributes["rows_changed"].int_value:  # (the last batch finds no row left)
            assert attributes["rows_changed"].int_value == BATCH
            firsts.append(attributes["first_key"].string_value)
    assert read == ROWS
    assert sorted(firsts, key=int) == [str(1 + BATCH * i) for i in range(ROWS // BATCH)]
