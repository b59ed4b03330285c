"""Never down: no answer, file or value crashes, hangs or stalls the agent (a real process).

Each thread of the agent (the poll loop, the event workers, the maintenance watcher, the fleet
gate) is made to raise once through its ``raise:`` failpoint; slow and silent stand-ins for
IMDS, ARM and the coordinator hold requests past their deadlines; a damaged state file is
started on."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.agent_harness import calls
from tests.conftest import Emulator, approved_ids, wait_until
from tests.fleet_harness import FleetLockServer
from tests.reliability.agents import AgentProcess

THREADS = ("poll", "event", "maintenance", "fleet")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def metric(url: str, name: str, labels: str) -> float | None:
    for line in requests.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    return None


@pytest.fixture
def processes() -> Iterator[list[AgentProcess]]:
    running: list[AgentProcess] = []
    yield running
    for process in running:
        if process.alive():
            process.kill()


def test_every_thread_that_raises_once_logs_counts_and_carries_on(
    live: Emulator, tmp_path: Path, processes: list[AgentProcess]
) -> None:
    fleetlock = FleetLockServer(slots=1).start()
    port = free_port()
    try:
        processes.append(
            agent := AgentProcess(
                tmp_path,
                live.url,
                failpoints=",".join(f"raise:{thread}" for thread in THREADS),
                metrics={"listen": f"127.0.0.1:{port}"},
                maintenance={"check_interval_seconds": 0.5},
                fleet={
                    "url": fleetlock.url,
                    "backend": "fleetlock",
                    "group": "web",
                    "retry_seconds": 0.2,
                },
            )
        )
        event = live.add_event(type="Reboot")
        # The event's worker raised once and is taken up again: prepared, approved.
        wait_until(lambda: approved_ids(live) == [event["EventId"]], timeout=60)
        assert f"end prepare Reboot {event['EventId']}" in calls(tmp_path)
        url = f"http://127.0.0.1:{port}"
        for thread in THREADS:
            wait_until(
                lambda thread=thread: (
                    metric(
                        url, "scheduled_events_agent_unexpected_errors_total", f'thread="{thread}"'
                    )
                    == 1
                ),
                timeout=30,
            )
        logs = agent.logs()
        failed = [
            line
            for line in logs
            if line.get("event") in ("thread.unexpected_error", "event.work_failed")
        ]
        assert sorted(line["thread"] for line in failed) == sorted(THREADS)
        for line in failed:
            assert "Traceback" in line["exception"] and "InjectedFailure" in line["exception"]
        assert not [line for line in logs if line["event"] == "not-json"]
        # Each carried on: polls go on, the windows are read again, the gate asked for a slot.
        checked = metric(url, "scheduled_events_agent_polls_total", 'outcome="unchanged"') or 0
        wait_until(
            lambda: (
                (metric(url, "scheduled_events_agent_polls_total", 'outcome="unchanged"') or 0)
                > checked
            )
        )
        assert any(line["event"] == "maintenance.windows" for line in agent.logs())
        assert any(request["path"] == "/v1/pre-reboot" for request in fleetlock.requests)
        assert agent.alive()
        assert agent.stop() == 0
    finally:
        fleetlock.stop()
