"""What the bench sections share: waiting on a condition, and a free port on 127.0.0.1."""

from __future__ import annotations

import socket
import time
from typing import Any


def wait_for(condition: Any, timeout: float = 120.0, interval: float = 0.005) -> Any:
    """``condition()``'s first true value, polled every ``interval``; TimeoutError after."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
