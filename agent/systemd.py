"""The sd_notify protocol: READY=1, WATCHDOG=1, STATUS=..., STOPPING=1 over ``NOTIFY_SOCKET``.

A few lines of standard library instead of a compiled dependency. Without ``NOTIFY_SOCKET``
(not started by systemd) every call does nothing. Sending never raises: a lost notification
must not stop the agent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, environment: Mapping[str, str] | None = None) -> None:
        values = os.environ if environment is None else environment
        address = values.get("NOTIFY_SOCKET", "")
        # An address starting with "@" is in the abstract namespace: a leading NUL byte.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        watchdog_usec = values.get("WATCHDOG_USEC", "")
        watchdog_pid = values.get("WATCHDOG_PID", "")
        self.watchdog_seconds: float | None = None
        if watchdog_usec.isdigit() and (not watchdog_pid or watchdog_pid == str(os.getpid())):
            self.watchdog_seconds = int(watchdog_usec) / 1_000_000
        self._last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, **fields: str) -> bool:
        """Send ``KEY=value`` lines (``send(READY="1")``); False when not sent."""
        if not self._address:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as connection:
                connection.connect(self._address)
                connection.sendall(message)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send(READY="1", STATUS=status)

    def watchdog(self) -> None:
        if self.watchdog_seconds is not None:
            self.send(WATCHDOG="1")

    def status(self, status: str) -> None:
        """Send STATUS= when it changed since the last one."""
        if status != self._last_status:
            self._last_status = status
            self.send(STATUS=status)

    def stopping(self) -> None:
        self.send(STOPPING="1", STATUS="stopping")
