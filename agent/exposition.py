"""The metrics listener: ``/metrics`` for Prometheus and ``/healthz`` for probes.

Serves on ``metrics.listen`` (loopback by default) from a thread; ``/healthz`` answers 200 while
polls succeed and 503 with the reason otherwise.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

HealthCheck = Callable[[], "tuple[bool, str]"]


# At most this many connections are served at once; more are closed as soon as they are taken.
MAX_CONNECTIONS = 32
# A connection that sends nothing for this long is dropped: idle clients cannot pile up.
IDLE_SECONDS = 5.0


class MetricsServer(ThreadingHTTPServer):
    """Bounded: a flood of idle or slow clients on this port costs at most ``MAX_CONNECTIONS``
    threads and descriptors, each for at most ``IDLE_SECONDS`` of silence, never the agent's
    ability to open its hooks, its state file or its sockets."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, listen: str, registry: CollectorRegistry, health: HealthCheck) -> None:
        host, _, port = listen.rpartition(":")
        super().__init__((host.strip("[]") or "127.0.0.1", int(port)), _Handler)
        self.registry = registry
        self.health = health
        self._thread: threading.Thread | None = None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: this one is closed at once
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
        return f"http://{host!s}:{port}"

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


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    wbufsize = -1  # headers and body in one write: no Nagle delay for the scraper
    timeout = IDLE_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: scrapes every few seconds would drown the agent's own log."""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            healthy, reason = self.server.health()
            self._send(200 if healthy else 503, f"{reason}\n".encode(), "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found: try /metrics or /healthz\n", "text/plain; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
