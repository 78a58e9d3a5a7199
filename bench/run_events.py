"""What the benchmarks read from a run's `--events` file: per-batch durations and the run's own
rows/s (its first claim to its end, so interpreter start-up is left out), the figures the README
quotes; both benchmarks print them the same way."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True)
class RunFigures:
    batches: tuple[float, ...]  # seconds from BEGIN to COMMIT, per committed batch
    rows: int
    seconds: float  # from `run_started` to `run_finished`

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def summary(self, batch_size: int | str) -> str:
        b = self.batches
        return (
            f"batches              {len(b):,} of up to {batch_size} rows: "
            f"p50 {percentile(b, 0.5) * 1000:.1f} ms, p99 {percentile(b, 0.99) * 1000:.1f} ms, "
            f"max {max(b) * 1000:.1f} ms, mean {statistics.fmean(b) * 1000:.1f} ms\n"
            f"run (from --events)  {self.rate:>12,.0f} rows/s  ({self.rows:,} rows in "
            f"{self.seconds:.2f} s from run_started to run_finished)"
        )


def _moment(event: dict[str, object]) -> float:
    return datetime.fromisoformat(str(event["time"]).replace("Z", "+00:00")).timestamp()


def read_run(path: Path) -> RunFigures:
    """The figures of the one run an events file holds."""
    events = [json.loads(line) for line in path.read_text().splitlines()]
    batches = [e for e in events if e["event"] == "batch"]
    [started] = [e for e in events if e["event"] == "run_started"]
    [finished] = [e for e in events if e["event"] == "run_finished"]
    return RunFigures(
        batches=tuple(float(e["seconds"]) for e in batches),
        rows=sum(int(e["rows_read"]) for e in batches),
        seconds=_moment(finished) - _moment(started),
    )


def percentile(values: tuple[float, ...], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]
