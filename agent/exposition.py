"""The agent's listener: ``/metrics`` for Prometheus, ``/healthz`` for probes, ``/status`` (what
``scheduled-events-agent status`` shows, live), and the local mirror of the Scheduled Events
document (``/metadata/scheduledevents``, agent/mirror.py).

Serves on ``metrics.listen`` (loopback by default) from a thread; ``/healthz`` answers 200 while
polls succeed and 503 with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent.errors import AgentError
from agent.mirror import Answer, Mirror

HealthCheck = Callable[[], "tuple[bool, str]"]


# At most this many connections are served at once; more are closed as soon as they are taken.
MAX_CONNECTIONS = 32
# A connection that sends nothing for this long is dropped: idle clients cannot pile up.
IDLE_SECONDS = 5.0
# A request body (an approval POSTed to the mirror) is read up to this size, to be refused.
MAX_REQUEST_BYTES = 64 * 1024
# /status is computed at most this often (it reads the state store).
STATUS_SECONDS = 1.0


class MetricsServer(ThreadingHTTPServer):
    """Bounded: a flood of idle or slow clients on this port costs at most ``MAX_CONNECTIONS``
    threads and descriptors, each for at most ``IDLE_SECONDS`` of silence, never the agent's
    ability to open its hooks, its state file or its sockets."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self,
        listen: str,
        registry: CollectorRegistry,
        health: HealthCheck,
        mirror: Mirror | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        if ":" in host:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__((host, int(port)), _Handler)
        self.registry = registry
        self.health = health
        self.mirror = mirror
        self.status = _Cached(status, STATUS_SECONDS) if status is not None else None
        self._thread: threading.Thread | None = None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._waiting_lock = threading.Lock()
        self._waiting: dict[Any, float] = {}  # connection -> since when it awaits a request

    def awaiting(self, connection: Any, since: float | None) -> None:
        """``connection`` waits for a request since ``since``; None: it has one, or is gone."""
        with self._waiting_lock:
            if since is None:
                self._waiting.pop(connection, None)
            else:
                self._waiting[connection] = since

    def _evict_longest_waiting(self) -> None:
        with self._waiting_lock:
            if not self._waiting:
                return
            connection = min(self._waiting, key=self._waiting.__getitem__)
            del self._waiting[connection]
        _cut(connection)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            # Full: the connection that has waited longest for a request it never finished
            # (a client trickling bytes, say) makes room, so that a probe always gets in.
            self._evict_longest_waiting()
            if not self._slots.acquire(timeout=1.0):
                self.shutdown_request(request)  # still full: this one is closed at once
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host!s}]" if ":" in str(host) else str(host)
        return f"http://{host}:{port}"

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.2}, name="metrics", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _Cached:
    """``compute()``, made at most once per ``seconds``: a client asking for the status in a
    loop costs the agent one reading of its store a second."""

    def __init__(self, compute: Callable[[], dict[str, Any]], seconds: float) -> None:
        self._compute = compute
        self._seconds = seconds
        self._lock = threading.Lock()
        self._value: dict[str, Any] | None = None
        self._at = 0.0

    def get(self) -> dict[str, Any]:
        with self._lock:
            if self._value is None or time.monotonic() - self._at >= self._seconds:
                self._value = self._compute()
                self._at = time.monotonic()
            return self._value


def _cut(connection: Any) -> None:
    with contextlib.suppress(OSError):  # closed already
        connection.shutdown(socket.SHUT_RDWR)  # its thread's read returns, and it ends


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    wbufsize = -1  # headers and body in one write: no Nagle delay for the scraper
    timeout = IDLE_SECONDS

    def handle_one_request(self) -> None:
        """One request, which must arrive whole and be answered within ``IDLE_SECONDS`` of
        the moment the connection began waiting for it: a client that trickles a byte at a
        time keeps no slot longer than a silent one."""
        self.server.awaiting(self.connection, time.monotonic())
        timer = threading.Timer(IDLE_SECONDS, _cut, args=(self.connection,))
        timer.daemon = True
        timer.start()
        try:
            super().handle_one_request()
        finally:
            timer.cancel()
            self.server.awaiting(self.connection, None)

    def parse_request(self) -> bool:
        self.server.awaiting(self.connection, None)  # it has a request: not to be evicted
        return super().parse_request()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: scrapes every few seconds would drown the agent's own log."""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith("/metadata") and self.server.mirror is not None:
            self._answer(self.server.mirror.answer("GET", self.path, self.headers.get))
        elif path == "/metrics":
            self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path == "/status" and self.server.status is not None:
            try:
                body = json.dumps(self.server.status.get(), indent=2).encode()
            except AgentError as error:  # the store cannot be read: status falls back
                self._send(503, f"{error}\n".encode(), "text/plain; charset=utf-8")
                return
            self._send(200, body, "application/json")
        elif path == "/healthz":
            healthy, reason = self.server.health()
            self._send(200 if healthy else 503, f"{reason}\n".encode(), "text/plain; charset=utf-8")
        else:
            self._send(
                404, b"not found: try /metrics, /healthz or /status\n", "text/plain; charset=utf-8"
            )

    def do_HEAD(self) -> None:
        if self.path.startswith("/metadata") and self.server.mirror is not None:
            answer = self.server.mirror.answer("HEAD", self.path, self.headers.get)
            self._answer(Answer(answer.status, answer.headers, b""), length=len(answer.body))
        else:
            self._send(405, b"", "text/plain; charset=utf-8")

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit() or int(length) > MAX_REQUEST_BYTES:
            self.close_connection = True  # its body is not read: the connection cannot go on
        elif int(length):
            self.rfile.read(int(length))
        if self.path.startswith("/metadata") and self.server.mirror is not None:
            self._answer(self.server.mirror.answer("POST", self.path, self.headers.get))
        else:
            self._send(405, b"nothing takes a POST here\n", "text/plain; charset=utf-8")

    def _answer(self, answer: Answer, *, length: int | None = None) -> None:
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        if answer.status != 304:
            self.send_header("Content-Length", str(len(answer.body) if length is None else length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(answer.body)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
