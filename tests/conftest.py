"""Shared fixtures: a real emulator on 127.0.0.1 with a clock the test moves, and HTTP helpers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

from agent.emulator.server import EmulatorServer
from agent.emulator.world import World, system_now

API = "2020-07-01"
# The documented event keys, in the order Azure writes them (docs/AZURE.md section 2).
WIRE_ORDER = [
    "EventId",
    "EventStatus",
    "EventType",
    "ResourceType",
    "Resources",
    "NotBefore",
    "Description",
    "EventSource",
    "DurationInSeconds",
]


class MovableClock:
    """The emulator's notion of now, moved by the test instead of by waiting."""

    def __init__(self) -> None:
        self._now = datetime(2026, 11, 26, 12, 0, 0, tzinfo=timezone.utc)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def move(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)


class Emulator:
    """A running emulator and a client session for it (no proxies, no keep-alive surprises)."""

    def __init__(self, server: EmulatorServer, clock: MovableClock) -> None:
        self.server = server
        self.clock = clock
        self.url = server.url
        self.http = requests.Session()
        self.http.trust_env = False

    @property
    def world(self) -> World:
        return self.server.world

    def scheduled_events(self, api_version: str = API, **kwargs: Any) -> requests.Response:
        headers = {"Metadata": "true", **kwargs.pop("headers", {})}
        return self.http.get(
            f"{self.url}/metadata/scheduledevents",
            params={"api-version": api_version},
            headers=headers,
            timeout=10,
            **kwargs,
        )

    def document(self, api_version: str = API) -> dict[str, Any]:
        response = self.scheduled_events(api_version)
        assert response.status_code == 200, response.text
        document: dict[str, Any] = response.json()
        return document

    def approve(self, *event_ids: str, **kwargs: Any) -> requests.Response:
        body = {"StartRequests": [{"EventId": event_id} for event_id in event_ids]}
        return self.http.post(
            f"{self.url}/metadata/scheduledevents",
            params={"api-version": API},
            headers={"Metadata": "true"},
            json=body,
            timeout=10,
            **kwargs,
        )

    def control(self, method: str, path: str, body: Any = None) -> requests.Response:
        return self.http.request(method, f"{self.url}/emulator/{path}", json=body, timeout=10)

    def add_event(self, **fields: Any) -> dict[str, Any]:
        response = self.control("POST", "events", fields)
        assert response.status_code == 201, response.text
        event: dict[str, Any] = response.json()
        return event


@pytest.fixture
def start_emulator() -> Iterator[Callable[..., Emulator]]:
    """Start emulators with chosen options; the rate limit is off unless a test turns it on."""
    started: list[Emulator] = []

    def start(**options: Any) -> Emulator:
        clock = MovableClock()
        # The agent runs on the real clock; tests of the emulator alone move a fake one.
        now = system_now if options.pop("real_time", False) else clock.now
        world = World(vm_name=options.pop("vm_name", "web_4"), now=now)
        options.setdefault("rate_limit", None)
        server = EmulatorServer(world, "127.0.0.1", 0, **options).start()
        emulator = Emulator(server, clock)
        started.append(emulator)
        return emulator

    yield start
    for emulator in started:
        emulator.http.close()
        emulator.server.stop()


@pytest.fixture
def emulator(start_emulator: Callable[..., Emulator]) -> Emulator:
    return start_emulator()


@pytest.fixture
def live(start_emulator: Callable[..., Emulator]) -> Emulator:
    """An emulator on the real clock, for tests that run the agent."""
    return start_emulator(real_time=True)


def approved_ids(emulator: Emulator) -> list[str]:
    """Every EventId the emulator accepted an approval for, in order."""
    return [
        request["EventId"]
        for approval in emulator.control("GET", "approvals").json()
        for request in approval["body"]["StartRequests"]
    ]


def wait_until(
    condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Wait for a condition with a deadline; fail the test if it never holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@pytest.fixture
def azurite(tmp_path: Path) -> Iterator[Any]:
    """Azurite (Azure Storage's emulator) for one test, in its own directory."""
    from tests.fleet_harness import Azurite  # here: fleet_harness imports this module

    server = Azurite(tmp_path / "azurite").start()
    yield server
    server.stop()


@pytest.fixture
def agents() -> Iterator[dict[str, Any]]:
    """Agent processes by name, stopped (or, if dead, reaped) at the end of the test."""
    started: dict[str, Any] = {}
    yield started
    for agent in started.values():
        if agent.alive():
            agent.stop()
        else:
            agent.process.wait(timeout=30)
            agent.log.close()
