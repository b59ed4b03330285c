"""One agent per state file: an exclusive lock held for as long as ``run`` runs.

Invariants:
- The lock is ``flock`` on ``<state.path>.lock``, which holds the PID of its holder. The kernel
  lets it go when the process ends, however it ends (``kill -9`` included): nothing stale is
  ever left to clean up.
- If that file cannot be created (a read-only directory, say) or is no regular file (a FIFO, a
  link to /dev/null), the state directory itself is locked instead, so two agents still cannot
  share a state file.
- ``status``, ``history`` and ``approve`` never take it: they work beside a running daemon.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
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
            # O_NONBLOCK: a FIFO put there must not block the open (it is refused below).
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
            fd = os.open(self.path, flags, 0o644)
        except OSError as error:
            fd, where = self._lock_directory(f"{self.path} cannot be created: {error.strerror}")
        else:
            where = self.path
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                fd, where = self._lock_directory(f"{self.path} is not a regular file")
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

    def _lock_directory(self, why: str) -> tuple[int, str]:
        self.fallback = why
        return os.open(self._directory, os.O_RDONLY | os.O_CLOEXEC), self._directory

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
