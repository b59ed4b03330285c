"""One agent per state file: an exclusive lock held for as long as ``run`` runs.

Invariants:
- The lock is ``flock`` on ``<state.path>.lock``, which holds the PID of its holder. The kernel
  lets it go when the process ends, however it ends (``kill -9`` included): nothing stale is
  ever left to clean up.
- If that file cannot be created (a read-only directory, say), the state directory itself is
  locked instead, so two agents still cannot share a state file.
- ``status``, ``history`` and ``approve`` never take it: they work beside a running daemon.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path


class AlreadyRunning(Exception):
    def __init__(self, path: str, pid: str | None) -> None:
        holder = f"PID {pid}" if pid else "another process (its PID is unknown)"
        super().__init__(
            f"another agent already runs with this state file: {holder} holds {path} "
            "(stop it first, or give this one its own state.path)"
        )
        self.pid = pid


class InstanceLock:
    def __init__(self, state_path: str) -> None:
        self.path = f"{state_path}.lock"
        # Not resolved: a symlink loop at state.path must not stop the agent from starting.
        self._directory = os.path.dirname(os.path.abspath(state_path))
        self._fd: int | None = None
        self.fallback: str | None = None  # why the directory is locked instead of the file

    def acquire(self) -> InstanceLock:
        """Take the lock, or raise AlreadyRunning naming the holder's PID."""
        Path(self._directory).mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            self.fallback = f"{self.path} cannot be created: {error.strerror}"
            fd = os.open(self._directory, os.O_RDONLY | os.O_CLOEXEC)
            where = self._directory
        else:
            where = self.path
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            pid = _read_pid(fd) if where == self.path else None
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AlreadyRunning(where, pid) from None
            raise
        if where == self.path:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing lets the lock go
            self._fd = None


def _read_pid(fd: int) -> str | None:
    with contextlib.suppress(OSError):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return text if text.isdigit() else None
    return None
