"""Time as a collaborator: wall time, monotonic time, and a wait that a stop flag ends early.

The daemon and the hook runner get a Clock passed in; tests use a fake one and never sleep to
test timing logic.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, aware, in UTC."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary start, never going backwards."""

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True when the stop flag ended the wait early."""


class SystemClock:
    """The real clock. ``wait`` returns at once when ``stop`` is set."""

    def __init__(self, stop: threading.Event | None = None) -> None:
        self.stop = stop if stop is not None else threading.Event()

    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, seconds: float) -> bool:
        # threading refuses a timeout past TIMEOUT_MAX (OverflowError): none is that long.
        return self.stop.wait(min(max(0.0, seconds), threading.TIMEOUT_MAX / 2))
