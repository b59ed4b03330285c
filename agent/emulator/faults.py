"""Fault injection and the rate limit: what the emulator does before it looks at a request.

Invariants:
- Faults apply to requests under ``/metadata/`` only, in the order queued, each ``count`` times,
  before every other check (README, The emulator).
- The rate limit counts every request under ``/metadata/`` (GET and POST, whatever their answer)
  in a sliding one-second window; above the limit the answer is 429. ``/emulator/`` never counts.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Fault:
    count: int
    status: int | None = None
    delay_seconds: float = 0.0
    body: str | None = None
    drop: bool = False

    @classmethod
    def from_json(cls, data: Any) -> Fault:
        """Build a fault from a control-API body; raises ValueError saying what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        unknown = sorted(set(data) - {"status", "count", "delay_seconds", "body", "drop"})
        if unknown:
            raise ValueError(f"unknown fields: {', '.join(unknown)}")
        count = data.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError("count: expected an integer >= 1")
        status = data.get("status")
        if status is not None and (
            not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599
        ):
            raise ValueError("status: expected an HTTP status code")
        delay = data.get("delay_seconds", 0)
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
            raise ValueError("delay_seconds: expected a number >= 0")
        body = data.get("body")
        if body is not None and not isinstance(body, str):
            raise ValueError("body: expected a string")
        drop = data.get("drop", False)
        if not isinstance(drop, bool):
            raise ValueError("drop: expected true or false")
        if status is None and body is None and not drop and delay == 0:
            raise ValueError("a fault needs one of status, body, drop or delay_seconds")
        return cls(count=count, status=status, delay_seconds=float(delay), body=body, drop=drop)


class FaultQueue:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: deque[Fault] = deque()

    def push(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def take(self) -> Fault | None:
        """The fault for this request, if one is queued; uses up one of its count."""
        with self._lock:
            if not self._faults:
                return None
            fault = self._faults[0]
            fault.count -= 1
            if fault.count == 0:
                self._faults.popleft()
            return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()


class RateLimiter:
    """At most ``limit`` requests in any one-second window; ``None`` turns the limit off."""

    def __init__(
        self, limit: int | None = 5, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._limit = limit
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._recent: deque[float] = deque()

    def admit(self) -> bool:
        """Count one request; False when it goes over the limit."""
        now = self._monotonic()
        with self._lock:
            while self._recent and self._recent[0] <= now - 1.0:
                self._recent.popleft()
            self._recent.append(now)
            return self._limit is None or len(self._recent) <= self._limit
