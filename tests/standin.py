"""A stand-in for IMDS on 127.0.0.1 that serves whatever document a test sets, byte for byte.

The emulator only writes well-formed documents; Azure (and whatever sits in between) may not.
This server answers GET /metadata/scheduledevents with the body set last, and records every
POST's body. Nothing else.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class StandIn:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._body = b'{"DocumentIncarnation": 1, "Events": []}'
        self.posts: list[dict[str, Any]] = []
        self.post_status = 200
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    body = owner._body
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
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

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
