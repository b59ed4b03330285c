"""Fakes for the tests of logic: a clock whose time moves only when the code under test waits
(or the test moves it).

The fake clock starts at a fixed moment, never at today's date, so no test depends on the day it
runs. ``SCHEDULED_EVENTS_AGENT_TEST_NOW`` (ISO 8601) moves that start, to show that the tests
pass on any date: ``SCHEDULED_EVENTS_AGENT_TEST_NOW=2027-12-02T12:00:00Z make test``.
"""

from __future__ import annotations

import os
import threading
from datetime import datetime, timedelta, timezone

DEFAULT_START = datetime(2026, 11, 26, 12, 0, 0, tzinfo=timezone.utc)


def fake_start() -> datetime:
    """The moment fake clocks start at: fixed, or taken from the environment."""
    text = os.environ.get("SCHEDULED_EVENTS_AGENT_TEST_NOW", "")
    if not text:
        return DEFAULT_START
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class FakeClock:
    """Virtual time. ``wait(seconds)`` advances it at once; the stop flag ends waits early."""

    def __init__(self, start: datetime | None = None, stop: threading.Event | None = None):
        self.stop = stop if stop is not None else threading.Event()
        self._now = start if start is not None else fake_start()
        self._monotonic = 1000.0
        self._lock = threading.Lock()
        self.waited: list[float] = []

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._monotonic

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)
            self._monotonic += seconds

    def wait(self, seconds: float) -> bool:
        if self.stop.is_set():
            return True
        seconds = max(0.0, seconds)
        with self._lock:
            self.waited.append(seconds)
        self.advance(seconds)
        return self.stop.is_set()
