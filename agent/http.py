"""HTTP with an overall deadline: what every outbound request of the agent goes through (IMDS,
its managed-identity tokens, Azure Resource Manager, storage and FleetLock).

``requests``' read timeout bounds each read of the socket, not the answer: a server that
trickles one byte a second, or sends headers forever, restarts it with every byte. Here the
``timeout`` of a request is its whole budget, connecting included, and setting the stop flag
ends it too.

Invariants:
- One monitor thread watches every request in flight. When a request's deadline passes, or its
  stop flag is set, the monitor shuts its socket down; the blocked read returns at once, and
  the request raises :class:`DeadlineExceeded` (a ``requests.Timeout``).
- The socket is found through our own connection classes, mounted on the session: a new
  connection tells the request's guard its socket as soon as it is connected (so a TLS
  handshake is cut too), a pooled one just before it reads the answer.
- No redirect is followed: a 3xx is handed to the caller as an answer it did not expect.
- An answer is read whole, up to ``max_body_bytes`` (:class:`AnswerTooLarge` beyond), before
  ``request`` returns: nothing is left to read, untimed, afterwards.
- A cut answer's connection is closed, never put back in the pool.
- No proxy and no ``.netrc`` from the environment (``trust_env`` is off) unless the caller asks
  for them (Azure Resource Manager, which may be behind a proxy).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

# How often the monitor looks at the stop flags of requests in flight.
STOP_CHECK_SECONDS = 0.1


class DeadlineExceeded(requests.Timeout):
    """The request had no complete answer within its deadline, or the agent is stopping."""


class AnswerTooLarge(requests.RequestException):
    """The answer is larger than the session's ``max_body_bytes``."""


class ExchangeFailed(requests.RequestException):
    """Sending the request or reading the answer raised something that is no ``requests``
    error (``http.client`` raises ValueError for a negative chunk size, say): to the caller, a
    failed request like any other."""


def json_value(body: bytes | str) -> Any:
    """The JSON value of an answer. ValueError for anything that is not JSON, nesting too deep
    for the parser (RecursionError) included, so that callers need to catch one error only."""
    try:
        return json.loads(body)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


def retry_after_seconds(value: str, *, at_most: float) -> float | None:
    """A Retry-After in delta-seconds (ASCII digits, a fraction allowed), capped at
    ``at_most``; None when it is anything else (an HTTP date, a sign, '²', 'nan')."""
    match = _DELTA_SECONDS.fullmatch(value.strip())
    if match is None:
        return None
    return at_most if len(match.group(1)) > 12 else min(float(match.group(0)), at_most)


_DELTA_SECONDS = re.compile(r"([0-9]+)(?:\.[0-9]+)?")


class _Guard:
    """One request in flight: its deadline, its stop flag, and the socket to cut."""

    def __init__(self, seconds: float, stop: threading.Event | None) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.stop = stop
        self.why: str | None = None
        self._socket: socket.socket | None = None
        self._owned: list[socket.socket] = []  # duplicates made for this guard, closed at release
        self._lock = threading.Lock()  # cutting and closing never interleave

    def attach(self, sock: socket.socket | None, *, owned: bool = False) -> None:
        with self._lock:
            self._socket = sock
            if owned and sock is not None:
                self._owned.append(sock)
            if self.why is not None:
                _cut(sock)

    def fire(self, why: str) -> None:
        with self._lock:
            if self.why is not None:
                return
            self.why = why
            _cut(self._socket)

    def release(self) -> None:
        with self._lock:
            for sock in self._owned:
                sock.close()
            self._owned.clear()
            self._socket = None


def _cut(sock: socket.socket | None) -> None:
    if sock is None:
        return
    # socket.socket's own shutdown, also for a TLS socket: its reader gets end-of-file at once,
    # and the TLS object stays whole for the thread that is still using it.
    with contextlib.suppress(OSError):  # already closed
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Monitor:
    """The thread that cuts requests past their deadline or whose stop flag is set."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._guards: set[_Guard] = set()
        self._thread: threading.Thread | None = None

    def add(self, guard: _Guard) -> None:
        with self._condition:
            self._guards.add(guard)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, name="http-deadlines", daemon=True
                )
                self._thread.start()
            self._condition.notify()

    def remove(self, guard: _Guard) -> None:
        with self._condition:
            self._guards.discard(guard)

    def _watch(self) -> None:
        with self._condition:
            while True:
                while not self._guards:
                    self._condition.wait()
                now = time.monotonic()
                for guard in list(self._guards):
                    if guard.stop is not None and guard.stop.is_set():
                        guard.fire("the agent is stopping")
                    elif now >= guard.deadline:
                        guard.fire(f"no complete answer within {guard.seconds:g} s")
                    else:
                        continue
                    self._guards.discard(guard)
                nearest = min((guard.deadline for guard in self._guards), default=now)
                self._condition.wait(max(0.0, min(nearest - now, STOP_CHECK_SECONDS)))


_MONITOR = _Monitor()
_current = threading.local()


def _tell_guard(sock: socket.socket | None) -> None:
    guard = getattr(_current, "guard", None)
    if guard is not None:
        guard.attach(sock)


def _guard_new(sock: socket.socket) -> socket.socket:
    """Give the guard a new connection's socket from the moment it is connected, so that a
    TLS handshake or a proxy's CONNECT that never ends is cut too. A duplicate: wrapping the
    socket in TLS detaches the original object from its descriptor."""
    guard = getattr(_current, "guard", None)
    if guard is not None:
        guard.attach(sock.dup(), owned=True)
    return sock


class _GuardedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _guard_new(super()._new_conn())

    def getresponse(self, *arguments: Any, **options: Any) -> Any:
        _tell_guard(self.sock)  # a pooled connection is told again for each request
        return super().getresponse(*arguments, **options)


class _GuardedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return _guard_new(super()._new_conn())

    def getresponse(self, *arguments: Any, **options: Any) -> Any:
        _tell_guard(self.sock)
        return super().getresponse(*arguments, **options)


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


_GUARDED_POOLS = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


class _GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *arguments: Any, **options: Any) -> None:
        super().init_poolmanager(*arguments, **options)
        self.poolmanager.pool_classes_by_scheme = dict(_GUARDED_POOLS)

    def proxy_manager_for(self, *arguments: Any, **options: Any) -> Any:
        # Through an HTTP proxy too (ARM may need one): the proxy's connections are guarded.
        manager = super().proxy_manager_for(*arguments, **options)
        manager.pool_classes_by_scheme = dict(_GUARDED_POOLS)
        return manager


class DeadlineSession(requests.Session):
    """A ``requests.Session`` whose ``timeout`` is each request's whole budget (a pair is
    added up), whose requests end when ``stop`` is set, and which follows no redirect."""

    def __init__(
        self,
        *,
        stop: threading.Event | None = None,
        max_body_bytes: int = 4 * 1024 * 1024,
        trust_env: bool = False,
    ) -> None:
        super().__init__()
        self.trust_env = trust_env
        self.stop = stop
        self.max_body_bytes = max_body_bytes
        adapter = _GuardedAdapter()
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def request(  # type: ignore[override]
        self, method: str, url: str, *arguments: Any, **options: Any
    ) -> requests.Response:
        timeout = options.get("timeout")
        if timeout is None:
            raise ValueError("every request of the agent needs a timeout")
        seconds = float(sum(timeout)) if isinstance(timeout, tuple) else float(timeout)
        options["stream"] = True
        # Never followed: a redirect could carry the VM's token, or its traffic, anywhere. A 3xx
        # is an answer like any other the caller did not expect.
        options["allow_redirects"] = False
        guard = _Guard(seconds, self.stop)
        if self.stop is not None and self.stop.is_set():
            raise DeadlineExceeded(f"{method} {url}: the agent is stopping")
        _current.guard = guard
        _MONITOR.add(guard)
        try:
            response = super().request(method, url, *arguments, **options)
            try:
                body = self._read(response, url, guard)
            except BaseException:
                response.close()  # not consumed: the connection is closed, not pooled
                raise
        except requests.RequestException as error:
            if guard.why is not None and not isinstance(error, AnswerTooLarge):
                raise DeadlineExceeded(f"{method} {url}: {guard.why}") from None
            raise
        except Exception as error:
            if guard.why is not None:
                raise DeadlineExceeded(f"{method} {url}: {guard.why}") from None
            raise ExchangeFailed(f"{method} {url}: {type(error).__name__}: {error}") from None
        finally:
            _current.guard = None
            _MONITOR.remove(guard)
            guard.release()
        if guard.why is not None:
            response.close()
            raise DeadlineExceeded(f"{method} {url}: {guard.why}")
        response._content = body
        response._content_consumed = True  # type: ignore[attr-defined]
        response.close()  # consumed: the connection goes back to the pool for the next one
        return response

    def _read(self, response: requests.Response, url: str, guard: _Guard) -> bytes:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise AnswerTooLarge(
                f"the answer of {url} is {declared} bytes, over the {self.max_body_bytes} "
                "byte limit"
            )
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_content(chunk_size=65536):
            size += len(chunk)
            if size > self.max_body_bytes:
                raise AnswerTooLarge(
                    f"the answer of {url} is over the {self.max_body_bytes} byte limit"
                )
            chunks.append(chunk)
            if guard.why is not None:
                break
        return b"".join(chunks)
