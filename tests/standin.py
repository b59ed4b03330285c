"""A stand-in for IMDS on 127.0.0.1 that serves whatever document a test sets, byte for byte.

The emulator only writes well-formed documents; Azure (and whatever sits in between) may not.
This server answers GET /metadata/scheduledevents with the body set last, and records every
POST's body. Nothing else.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class StandIn:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._body = b'{"DocumentIncarnation": 1, "Events": []}'
        self.posts: list[dict[str, Any]] = []
        self.post_status = 200
        self.post_answers_body = False  # True: a POST is answered with the body set last
        self.gets = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    body = owner._body
                    owner.gets += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                data = json.loads(self.rfile.read(length) or b"{}")
                with owner._lock:
                    owner.posts.append(data)
                    status = owner.post_status
                    answer = owner._body if owner.post_answers_body else b""
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def serve_bytes(self, body: bytes) -> None:
        with self._lock:
            self._body = body

    def serve(self, document: Any) -> None:
        """Serve ``document`` from now on: a JSON value, or raw bytes as they are."""
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        with self._lock:
            self._body = body

    def approved_ids(self) -> list[str]:
        with self._lock:
            return [request["EventId"] for post in self.posts for request in post["StartRequests"]]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class SlowServer:
    """A server on 127.0.0.1 that answers every request as ``mode`` says, set at any time:

    - ``good``: 200 with ``body`` at once;
    - ``trickle``: the status line and headers at once, then ``body`` one byte a second;
    - ``trickle_headers``: the status line and headers one byte a second, forever;
    - ``truncated``: half the body it declares, then the connection is closed;
    - ``oversized``: a 5 MiB body;
    - ``silent``: reads the request and never answers (the connection stays open);
    - ``bad_chunk``: a chunked body whose first chunk size is ``-5``;
    - ``trickle_tls``: takes a TLS ClientHello and answers with a TLS record one byte a
      second, so that the handshake itself never ends (use the URL with ``https://``).

    ``requests`` counts the requests it read."""

    def __init__(
        self, body: bytes = b'{"DocumentIncarnation": 1, "Events": []}' + b" " * 4000
    ) -> None:
        self.mode = "good"
        self.body = body
        self.requests = 0
        self._closing = threading.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self._connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        if self.mode == "trickle_tls":
            with contextlib.suppress(OSError):
                connection.recv(65536)  # the ClientHello
                self.requests += 1
                # A handshake record announcing 16 KiB, then its bytes one a second.
                self._drip(connection, b"\x16\x03\x03\x40\x00" + b"\x00" * 16384)
            return
        reader = connection.makefile("rb")
        try:
            while not self._closing.is_set():
                length = 0
                line = reader.readline()
                if not line:
                    return
                while (header := reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip() or "0")
                reader.read(length)
                self.requests += 1
                self._answer(connection)
        except OSError:
            return
        finally:
            reader.close()
            connection.close()

    def _answer(self, connection: socket.socket) -> None:
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(self.body)}\r\n\r\n"
        ).encode()
        mode = self.mode
        if mode == "good":
            connection.sendall(head + self.body)
        elif mode == "trickle":
            connection.sendall(head)
            self._drip(connection, self.body)
        elif mode == "truncated":
            connection.sendall(head + self.body[: len(self.body) // 2])
            connection.shutdown(socket.SHUT_RDWR)
        elif mode == "oversized":
            size = 5 * 1024 * 1024
            connection.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {size}\r\n\r\n".encode()
                + b" " * size
            )
        elif mode == "bad_chunk":
            connection.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n"
            )
        elif mode == "trickle_headers":
            self._drip(connection, head + b"X-Slow: " + b"x" * 100_000)
        else:
            self._closing.wait()

    def _drip(self, connection: socket.socket, data: bytes) -> None:
        for index in range(len(data)):
            if self._closing.wait(1.0):
                return
            connection.sendall(data[index : index + 1])

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
