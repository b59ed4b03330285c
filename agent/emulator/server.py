"""The emulator's HTTP front: IMDS's paths and checks, and the control API under ``/emulator/``.

Invariants (README, The emulator, docs/AZURE.md sections 1, 3 and 5):
- Requests under ``/metadata/`` meet, in this order: queued faults, the rate limit, the first-call
  delay, the ``Metadata: true`` and ``X-Forwarded-For`` checks, the verb, the api-version.
- Answers are compact JSON, ``Content-Type: application/json; charset=utf-8``, always with a
  Content-Length, over HTTP/1.1 keep-alive, so a client can reuse one connection.
- Requests under ``/emulator/`` never count toward the rate limit and never meet faults.
"""

from __future__ import annotations

import json
import secrets
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from agent.emulator import arm
from agent.emulator.faults import Fault, FaultQueue, RateLimiter
from agent.emulator.wire import (
    INSTANCE_VERSIONS,
    SCHEDULED_EVENTS_VERSIONS,
    TOKEN_VERSIONS,
    compact_json,
)
from agent.emulator.world import ControlError, World

# Large enough for a control request that injects a 10 MB body as a fault.
MAX_REQUEST_BYTES = 32 * 1024 * 1024
_JSON = "application/json; charset=utf-8"


class EmulatorServer(ThreadingHTTPServer):
    """A threaded HTTP server around one :class:`World`. ``start()`` serves from a thread."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        world: World,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        rate_limit: int | None = 5,
        first_call_delay_seconds: float = 0.0,
        etag: bool = True,
        instance: dict[str, str] | None = None,
        rate_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__((host, port), _Handler)
        self.world = world
        self.faults = FaultQueue()
        self.rate_limiter = RateLimiter(rate_limit, rate_clock)
        self.first_call_delay_seconds = first_call_delay_seconds
        self.etag = etag
        self.instance_overrides = dict(instance or {})
        self.vm_id = str(uuid.uuid4())
        self.stopping = threading.Event()
        self.connections = 0
        self.requests = 0
        self.first_metadata_request_at: float | None = None
        self.scheduled_events_requests = 0
        # When a document of each incarnation was first sent whole (time.time()), the newest.
        self.documents_sent_at: dict[int, float] = {}
        self.arm = arm.ArmState()
        self._first_call_pending = first_call_delay_seconds > 0
        self._counter_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> EmulatorServer:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="emulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-answer is normal (it refused a huge body, say): no noise."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def count_connection(self) -> None:
        with self._counter_lock:
            self.connections += 1

    def count_request(self) -> None:
        with self._counter_lock:
            self.requests += 1

    def count_scheduled_events_request(self) -> None:
        with self._counter_lock:
            self.scheduled_events_requests += 1

    def document_sent(self, incarnation: int) -> None:
        with self._counter_lock:
            if incarnation not in self.documents_sent_at:
                self.documents_sent_at[incarnation] = time.time()
                while len(self.documents_sent_at) > 256:
                    del self.documents_sent_at[next(iter(self.documents_sent_at))]

    def take_first_call_delay(self) -> float:
        with self._counter_lock:
            if not self._first_call_pending:
                return 0.0
            self._first_call_pending = False
            return self.first_call_delay_seconds

    def instance_document(self) -> dict[str, Any]:
        name = self.world.vm_name
        compute = {
            "name": name,
            "vmId": self.vm_id,
            "subscriptionId": "00000000-0000-0000-0000-000000000000",
            "resourceGroupName": "emulated-rg",
            "vmScaleSetName": "",
            "platformUpdateDomain": "0",
            "platformFaultDomain": "0",
            "location": "westeurope",
            "zone": "",
            "osType": "Linux",
            "vmSize": "Standard_D2s_v5",
        }
        compute.update(self.instance_overrides)
        compute.setdefault(
            "resourceId",
            f"/subscriptions/{compute['subscriptionId']}/resourceGroups/"
            f"{compute['resourceGroupName']}/providers/Microsoft.Compute/virtualMachines/{name}",
        )
        return {"compute": compute, "network": {"interface": []}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so clients can reuse one connection
    server: EmulatorServer

    # Headers and body leave in one write: with two small writes, Nagle's algorithm and the
    # client's delayed ACK hold every answer back by 40 ms.
    wbufsize = -1

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.count_connection()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the emulator's callers read its answers, not its access log."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    # Routing -------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        self.server.count_request()
        parts = urlsplit(self.path)
        path = unquote(parts.path).rstrip("/") or "/"
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        body = self._read_body()
        if body is None:
            return
        if path.startswith("/metadata/") or path == "/metadata":
            self._metadata(method, path, query, body)
        elif path.startswith("/emulator/"):
            self._control(method, path, body)
        elif path.startswith(("/subscriptions/", "/emulator-arm/")):
            self._arm(method, path, query)
        else:
            self._send_json(404, {"error": f"not found: {path}"})

    def _read_body(self) -> bytes | None:
        length_text = self.headers.get("Content-Length", "0") or "0"
        if not length_text.isdigit():
            self._send_json(400, {"error": "bad Content-Length"}, close=True)
            return None
        length = int(length_text)
        if length > MAX_REQUEST_BYTES:
            self._send_json(413, {"error": "request body too large"}, close=True)
            return None
        return self.rfile.read(length) if length else b""

    # IMDS ----------------------------------------------------------------------------------

    def _metadata(self, method: str, path: str, query: dict[str, str], body: bytes) -> None:
        if self.server.first_metadata_request_at is None:
            self.server.first_metadata_request_at = time.time()
        fault = self.server.faults.take()
        if fault is not None and self._apply_fault(fault):
            return
        if not self.server.rate_limiter.admit():
            self._send_json(429, {"error": "Too many requests"}, extra={"Retry-After": "1"})
            return
        if path == "/metadata/scheduledevents":
            delay = self.server.take_first_call_delay()
            if delay and self.server.stopping.wait(delay):
                self._drop()
                return
        if self.headers.get("Metadata") != "true":
            self._send_json(400, {"error": "Bad request. Required metadata header not specified"})
            return
        if self.headers.get("X-Forwarded-For") is not None:
            self._send_json(400, {"error": "Bad request. Request contains X-Forwarded-For header"})
            return
        if path == "/metadata/scheduledevents":
            self.server.count_scheduled_events_request()
            self._scheduled_events(method, query, body)
        elif path == "/metadata/instance" or path.startswith("/metadata/instance/"):
            self._instance(method, path, query)
        elif path == "/metadata/identity/oauth2/token":
            self._token(method, query)
        elif path == "/metadata/versions":
            if self._verb_allowed(method, ("GET",)):
                self._send_json(200, {"apiVersions": list(INSTANCE_VERSIONS)})
        else:
            self._send_json(404, {"error": "Not found"})

    def _apply_fault(self, fault: Fault) -> bool:
        """Carry out a fault; True when it answered (or dropped) the request."""
        if fault.delay_seconds and self.server.stopping.wait(fault.delay_seconds):
            self._drop()
            return True
        if fault.drop:
            self._drop()
            return True
        if fault.body is not None:
            self._send(fault.status or 200, fault.body.encode("utf-8"), _JSON)
            return True
        if fault.status is not None:
            self._send_json(fault.status, {"error": f"injected fault {fault.status}"})
            return True
        return False

    def _verb_allowed(self, method: str, allowed: tuple[str, ...]) -> bool:
        if method in allowed:
            return True
        self._send_json(
            405, {"error": f"Method {method} not allowed"}, extra={"Allow": ", ".join(allowed)}
        )
        return False

    def _api_version_ok(self, query: dict[str, str], known: tuple[str, ...]) -> bool:
        version = query.get("api-version")
        if version is None:
            self._send_json(
                400,
                {
                    "error": "Bad request. api-version was not specified",
                    "newest-versions": [known[-1]],
                },
            )
            return False
        if version not in known:
            self._send_json(
                400,
                {
                    "error": f"Bad request. api-version {version} is invalid or not supported",
                    "newest-versions": [known[-1]],
                },
            )
            return False
        return True

    def _scheduled_events(self, method: str, query: dict[str, str], body: bytes) -> None:
        if not self._verb_allowed(method, ("GET", "POST")):
            return
        if not self._api_version_ok(query, SCHEDULED_EVENTS_VERSIONS):
            return
        world = self.server.world
        world.advance()
        if method == "POST":
            self._approve(body)
            return
        with world.lock:
            document = world.document(query["api-version"])
        etag = f'"{document["DocumentIncarnation"]}"'
        if self.server.etag and self.headers.get("If-None-Match") == etag:
            self._send(304, b"", None, extra={"ETag": etag})
            return
        extra = {"ETag": etag} if self.server.etag else {}
        self._send(200, compact_json(document), _JSON, extra=extra)
        self.wfile.flush()
        self.server.document_sent(document["DocumentIncarnation"])

    def _approve(self, body: bytes) -> None:
        # Parsed as JSON whatever the Content-Type: curl -d sends it form-encoded.
        try:
            payload = json.loads(body)
        except ValueError:
            self._send_json(400, {"error": "Bad request. The body is not JSON"})
            return
        requests_list = payload.get("StartRequests") if isinstance(payload, dict) else None
        if (
            not isinstance(requests_list, list)
            or not requests_list
            or not all(
                isinstance(item, dict) and isinstance(item.get("EventId"), str)
                for item in requests_list
            )
        ):
            self._send_json(
                400, {"error": 'Bad request. Expected {"StartRequests":[{"EventId":"..."}]}'}
            )
            return
        event_ids = [item["EventId"] for item in requests_list]
        world = self.server.world
        with world.lock:
            unknown = world.unknown_ids(event_ids)
            if unknown:
                self._send_json(400, {"error": f"Bad request. Unknown EventId {unknown[0]}"})
                return
            world.approve(event_ids, payload)
        self._send(200, b"", None)

    def _instance(self, method: str, path: str, query: dict[str, str]) -> None:
        if not self._verb_allowed(method, ("GET",)):
            return
        if not self._api_version_ok(query, INSTANCE_VERSIONS):
            return
        node: Any = self.server.instance_document()
        for segment in path.split("/")[3:]:
            if isinstance(node, dict) and segment in node:
                node = node[segment]
            elif isinstance(node, list) and segment.isdigit() and int(segment) < len(node):
                node = node[int(segment)]
            else:
                self._send_json(404, {"error": "Not found"})
                return
        if query.get("format") == "text" and not isinstance(node, (dict, list)):
            self._send(200, str(node).encode("utf-8"), "text/plain; charset=utf-8")
            return
        self._send_json(200, node)

    def _token(self, method: str, query: dict[str, str]) -> None:
        if not self._verb_allowed(method, ("GET",)):
            return
        if not self._api_version_ok(query, TOKEN_VERSIONS):
            return
        resource = query.get("resource")
        if not self.server.arm.identity:
            self._send_json(
                400,
                {"error": "invalid_request", "error_description": "Identity not found"},
            )
            return
        if not resource:
            self._send_json(
                400,
                {
                    "error": "invalid_request",
                    "error_description": "Required query variable 'resource' is missing",
                },
            )
            return
        now = int(time.time())
        lifetime = 86399
        self._send_json(
            200,
            {
                "access_token": f"emulated.{secrets.token_hex(16)}",
                "client_id": self.server.vm_id,
                "expires_in": str(lifetime),
                "expires_on": str(now + lifetime),
                "ext_expires_in": str(lifetime),
                "not_before": str(now),
                "resource": resource,
                "token_type": "Bearer",
            },
        )

    # Control API ---------------------------------------------------------------------------

    def _control(self, method: str, path: str, body: bytes) -> None:
        world = self.server.world
        segments = path.split("/")[2:]  # after "", "emulator"
        try:
            payload = json.loads(body) if body.strip() else {}
        except ValueError:
            self._send_json(400, {"error": "the body is not JSON"})
            return
        try:
            world.advance()
            self._route_control(method, segments, payload)
        except ControlError as error:
            self._send_json(error.status, {"error": error.message})

    def _event_action(self, action: str, event_id: str) -> None:
        """``POST /emulator/events/{id}/ACTION``."""
        world = self.server.world
        if action == "complete":
            world.complete(event_id)
            self._send_json(200, {"completed": event_id})
            return
        actions = {
            "start": world.start,
            "co-tenant-approve": world.co_tenant_approve,
            # Approved outside the VM (az maintenance scheduledevents acknowledge, or the VM's
            # scheduledEventsPolicy): as an approval POST would, but not on /emulator/approvals.
            "approve-elsewhere": world.approve_elsewhere,
        }
        if action not in actions:
            raise ControlError(404, f"no control route POST /emulator/events/{event_id}/{action}")
        self._send_json(200, actions[action](event_id).wire("2020-07-01"))

    def _route_control(self, method: str, segments: list[str], payload: Any) -> None:
        world = self.server.world
        route = (method, *segments[:1], *(["{id}"] if len(segments) > 1 else []), *segments[2:])
        if route in (("POST", "events"), ("PATCH", "events", "{id}")):
            if not isinstance(payload, dict):
                raise ControlError(400, "expected a JSON object")
            if method == "POST":
                self._send_json(201, world.add(payload).wire("2020-07-01"))
            else:
                self._send_json(200, world.update(segments[1], payload).wire("2020-07-01"))
        elif route == ("GET", "events"):
            self._send_json(200, world.document("2020-07-01"))
        elif route == ("GET", "events", "{id}"):
            self._send_json(200, world.get(segments[1]).wire("2020-07-01"))
        elif route == ("DELETE", "events", "{id}"):
            world.cancel(segments[1])
            self._send_json(200, {"cancelled": segments[1]})
        elif route[:3] == ("POST", "events", "{id}") and len(route) == 4:
            self._event_action(route[3], segments[1])
        elif route == ("GET", "approvals"):
            with world.lock:
                self._send_json(200, list(world.approvals))
        elif route == ("POST", "faults"):
            try:
                fault = Fault.from_json(payload)
            except ValueError as error:
                raise ControlError(400, f"fault: {error}") from None
            self.server.faults.push(fault)
            self._send_json(201, {"queued": payload})
        elif route == ("POST", "arm"):
            try:
                self.server.arm.configure(payload if isinstance(payload, dict) else {})
            except ValueError as error:
                raise ControlError(400, f"arm: {error}") from None
            self._send_json(200, {"status": self.server.arm.status})
        elif route == ("GET", "arm"):
            self._send_json(
                200, {"status": self.server.arm.status, "performed": len(self.server.arm.performed)}
            )
        elif route == ("POST", "reset"):
            world.reset()
            self.server.faults.clear()
            self._send_json(200, {"reset": True})
        elif route == ("GET", "stats"):
            self._send_json(
                200,
                {
                    "connections": self.server.connections,
                    "requests": self.server.requests,
                    "first_metadata_request_at": self.server.first_metadata_request_at,
                    "scheduled_events_requests": self.server.scheduled_events_requests,
                    "documents_sent_at": {
                        str(incarnation): at
                        for incarnation, at in self.server.documents_sent_at.items()
                    },
                    "incarnation": world.incarnation,
                },
            )
        else:
            raise ControlError(404, f"no control route {method} /emulator/{'/'.join(segments)}")

    # Azure Resource Manager ----------------------------------------------------------------

    def _arm(self, method: str, path: str, query: dict[str, str]) -> None:
        state = self.server.arm
        if not self.headers.get("Authorization", "").startswith("Bearer emulated."):
            self._send_json(401, arm.error_body(401, self.server.world.vm_name))
            return
        error = state.take_error()
        if error is not None:
            extra = (
                {"Retry-After": str(error.get("retry_after", 1))} if error["status"] == 429 else {}
            )
            self._send_json(
                error["status"],
                arm.error_body(error["status"], self.server.world.vm_name),
                extra=extra,
            )
            return
        if query.get("api-version") not in arm.ARM_VERSIONS:
            self._send_json(
                400,
                {
                    "error": {
                        "code": "InvalidApiVersionParameter",
                        "message": "The api-version is invalid.",
                    }
                },
            )
            return
        if path.startswith("/emulator-arm/operations/") and method == "GET":
            operation = arm.poll(state, self.server.world, path.rsplit("/", 1)[1])
            if operation is None:
                self._send_json(404, {"error": {"code": "NotFound", "message": "No operation."}})
            else:
                self._send_json(200, operation)
            return
        resource_id = self.server.instance_document()["compute"]["resourceId"].lower()
        if path.lower() == f"{resource_id}/instanceview" and method == "GET":
            view: dict[str, Any] = {"computerName": self.server.world.vm_name, "statuses": []}
            with state.lock:
                if state.status is not None:
                    view["maintenanceRedeployStatus"] = dict(state.status)
            self._send_json(200, view)
        elif path.lower() == f"{resource_id}/performmaintenance" and method == "POST":
            status, body, location = arm.perform(state, self.server.world, self.server.url)
            extra = {}
            if location:
                version = query["api-version"]
                extra = {
                    "Location": f"{location}?api-version={version}",
                    "Azure-AsyncOperation": f"{location}?api-version={version}",
                    "Retry-After": "1",
                }
            self._send_json(status, body, extra=extra)
        else:
            self._send_json(
                404, {"error": {"code": "ResourceNotFound", "message": f"{path} was not found."}}
            )

    # Answers -------------------------------------------------------------------------------

    def _send_json(
        self, status: int, value: Any, *, extra: dict[str, str] | None = None, close: bool = False
    ) -> None:
        self._send(status, compact_json(value), _JSON, extra=extra, close=close)

    def _send(
        self,
        status: int,
        payload: bytes,
        content_type: str | None,
        *,
        extra: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        if status != 304:
            self.send_header("Content-Length", str(len(payload)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        # A request that asked to close (or HTTP/1.0 without keep-alive) is closed after this
        # answer: say so, or a keep-alive client reuses the dead socket for its next request.
        if close or self.close_connection:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD" and status != 304:
            self.wfile.write(payload)

    def _drop(self) -> None:
        """Close the connection without a word, as a reset IMDS does."""
        self.close_connection = True
        self.wfile.flush()
        self.connection.close()
