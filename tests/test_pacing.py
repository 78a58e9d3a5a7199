"""backfill.pacing.Ticker with a fake clock: when a progress write is due."""

from __future__ import annotations

from backfill.pacing import Ticker


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_first_call_is_due_whatever_the_time():
    assert Ticker(interval=5.0, clock=FakeClock(0.0)).due()
    assert Ticker(interval=5.0, clock=FakeClock(1_000.0)).due()


def test_not_due_again_before_the_interval():
    clock = FakeClock()
    ticker = Ticker(interval=5.0, clock=clock)
    assert ticker.due()
    assert not ticker.due()  # no time passed
    clock.now += 4.999
    assert not ticker.due()


def test_due_at_exactly_the_interval():
    clock = FakeClock()
    ticker = Ticker(interval=5.0, clock=clock)
    assert ticker.due()
    clock.now += 5.0
    assert ticker.due()
    assert not ticker.due()


def test_the_interval_counts_from_the_last_due_call_not_from_every_call():
    clock = FakeClock(0.0)
    ticker = Ticker(interval=5.0, clock=clock)
    seen = []
    for now in (0.0, 1.0, 3.0, 4.9, 6.0, 7.0, 10.9, 11.0, 30.0, 34.0, 35.0):
        clock.now = now
        seen.append((now, ticker.due()))
    assert [now for now, due in seen if due] == [0.0, 6.0, 11.0, 30.0, 35.0]


def test_a_zero_interval_is_always_due():
    clock = FakeClock()
    ticker = Ticker(interval=0.0, clock=clock)
    assert all(ticker.due() for _ in range(3))
