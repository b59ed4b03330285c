"""Coordinators for the fleet tests, on 127.0.0.1: Azurite, Microsoft's Azure Storage emulator, as
a real process, and a FleetLock server that follows the protocol Zincati defines."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from agent.fleet import BlobSlots
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent
# Azurite's development account: a well-known name and key, documented by Microsoft.
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def azurite_command() -> str:
    local = ROOT / "tools" / "node_modules" / ".bin" / "azurite-blob"
    found = str(local) if local.exists() else shutil.which("azurite-blob")
    if found is None:
        raise RuntimeError("azurite-blob is not installed: run `make azurite` (needs npm)")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Azurite:
    """``azurite-blob`` on 127.0.0.1, its data in ``directory``; stop and start it again at will."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "azurite.log"

    def container_url(self, container: str = "fleet") -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}/{container}"

    def start(self) -> Azurite:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    azurite_command(),
                    "--blobHost",
                    "127.0.0.1",
                    "--blobPort",
                    str(self.port),
                    "--location",
                    str(self.directory),
                    "--silent",
                    "--disableTelemetry",  # nothing leaves 127.0.0.1
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._listening, timeout=60, interval=0.1)
        return self

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"azurite exited: {self.log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def create_container(self, container: str = "fleet") -> str:
        """Create the container, as an operator would once; its URL."""
        url = self.container_url(container)
        client = BlobSlots(
            url, "setup", slots=1, lease_seconds=15, holder="setup", account_key=ACCOUNT_KEY
        )
        try:
            response = client.send("PUT", "", {"restype": "container"}, {"Content-Length": "0"})
            assert response.status_code == 201, response.text
        finally:
            client.close()
        return url


def fleet_section(url: str, **values: Any) -> dict[str, Any]:
    """A ``fleet`` configuration section for the blob backend on Azurite."""
    return {
        "url": url,
        "group": "web",
        "slots": 1,
        "lease_seconds": 15,
        "retry_seconds": 0.5,
        "account_key": ACCOUNT_KEY,
        **values,
    }


class FleetLockServer:
    """A FleetLock server: a counting semaphore per group, locks owned by client id, recursive
    lock and unlock, errors as ``{"kind": ..., "value": ...}`` (Zincati's FleetLock protocol)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.holders: dict[str, list[str]] = {}
        self.requests: list[dict[str, Any]] = []
        self.refuse_all = False
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FleetLockServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def held(self, group: str) -> list[str]:
        with self.lock:
            return list(self.holders.get(group, []))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fleetlock = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                status, answer = fleetlock.answer(self.path, dict(self.headers), body)
                data = json.dumps(answer).encode() if answer is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        def error(status: int, kind: str, value: str) -> tuple[int, Any]:
            return status, {"kind": kind, "value": value}

        with self.lock:
            if headers.get("fleet-lock-protocol") != "true":
                return error(400, "missing_header", "fleet-lock-protocol: true is required")
            try:
                params = json.loads(body)["client_params"]
                group, client = params["group"], params["id"]
            except (ValueError, KeyError, TypeError):
                return error(400, "bad_body", "expected {client_params: {group, id}}")
            self.requests.append({"path": path, "group": group, "id": client})
            holders = self.holders.setdefault(group, [])
            if self.refuse_all:
                return error(500, "failed_datastore", "the lock store is down")
            if path == "/v1/pre-reboot":
                if client in holders:
                    return 200, None
                if len(holders) >= self.slots:
                    return error(409, "failed_lock", f"all {self.slots} slots are held")
                holders.append(client)
                return 200, None
            if path == "/v1/steady-state":
                if client in holders:
                    holders.remove(client)
                return 200, None
            return error(404, "not_found", path)


def approval_times(emulator_url: str) -> list[tuple[str, str]]:
    """(time, EventId) of every approval the emulator accepted, in order."""
    approvals = requests.get(f"{emulator_url}/emulator/approvals", timeout=10).json()
    return [
        (approval["time"], request["EventId"])
        for approval in approvals
        for request in approval["body"]["StartRequests"]
    ]
