"""IMDS faults: every status of docs/AZURE.md section 1, timeouts, resets, truncated and non-JSON
bodies, a first call that takes 100 s, an incarnation that goes backwards, an event that
vanishes while its hook runs. The agent never exits, and handles the next good document."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.agent_harness import RunningAgent, calls, start_agent
from tests.conftest import Emulator, approved_ids, wait_until

FAULTS: list[dict[str, Any]] = [
    *({"status": status, "count": 3} for status in (400, 403, 404, 405, 410, 429, 500, 502, 503)),
    *({"status": status, "count": 60} for status in (404, 410, 429, 500, 503)),
    {"delay_seconds": 7, "count": 1},  # longer than the 5 s read timeout
    {"drop": True, "count": 3},
    {"drop": True, "count": 60},
    {"body": '{"DocumentIncarnation":9,"Events":[{"EventId":"28512AF7', "count": 3},
    {"body": "<html><body>Service Unavailable</body></html>", "count": 3},
    {"body": "", "count": 3},
    {"body": "null", "count": 3},
    {"body": '{"DocumentIncarnation":"x","Events":[]}', "count": 3},
    {"body": '{"DocumentIncarnation":3,"Events":[{"EventId":"a"}]}', "count": 3},
]


@pytest.fixture
def agents() -> Iterator[list[RunningAgent]]:
    running: list[RunningAgent] = []
    yield running
    for agent in running:
        agent.close()


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: str(fault)[:60])
def test_a_fault_never_stops_the_agent(
    live: Emulator,
    tmp_path: Path,
    agents: list[RunningAgent],
    fault: dict[str, Any],
    tried: Counter[str],
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url))
    wait_until(lambda: live.server.requests > 2)
    live.control("POST", "faults", fault)
    event = live.add_event(type="Reboot")
    wait_until(lambda: approved_ids(live) == [event["EventId"]], timeout=60, interval=0.1)
    assert agent.thread is not None and agent.thread.is_alive()
    tried["IMDS faults survived"] += 1


def test_a_first_call_that_takes_100_seconds(
    start_emulator: Callable[..., Emulator],
    tmp_path: Path,
    agents: list[RunningAgent],
    tried: Counter[str],
) -> None:
    emulator = start_emulator(real_time=True, first_call_delay_seconds=100)
    event = emulator.add_event(type="Reboot")
    agents.append(start_agent(tmp_path, emulator.url))
    wait_until(lambda: approved_ids(emulator) == [event["EventId"]], timeout=150, interval=0.5)
    # One request, answered after 100 s: the long first timeout waited for it.
    tried["first call of 100 s waited for"] += 1


def test_an_incarnation_that_goes_backwards(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent], tried: Counter[str]
) -> None:
    agents.append(start_agent(tmp_path, live.url))
    first = live.add_event(type="Freeze")
    wait_until(lambda: approved_ids(live) == [first["EventId"]])
    # IMDS turns off (24 h without a request: here, requests that fail) and on again, and its
    # incarnation starts over; the next document may even carry an incarnation seen before.
    live.control("POST", "faults", {"drop": True, "count": 40})
    wait_until(lambda: live.control("GET", "stats").json()["requests"] > 0)
    with live.world.lock:
        live.world.incarnation = 1
    second = live.add_event(type="Reboot")
    wait_until(lambda: approved_ids(live) == [first["EventId"], second["EventId"]])
    tried["incarnation going backwards"] += 1


def test_an_event_that_vanishes_while_its_hook_runs(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent], tried: Counter[str]
) -> None:
    (tmp_path / "block-prepare-Reboot").touch()
    agents.append(agent := start_agent(tmp_path, live.url))
    event = live.add_event(type="Reboot")
    wait_until((tmp_path / "pid-prepare-Reboot").exists)
    live.control("DELETE", f"events/{event['EventId']}")
    wait_until(lambda: live.control("GET", "events").json()["Events"] == [])
    (tmp_path / "block-prepare-Reboot").unlink()
    wait_until(
        lambda: (record := agent.store.get(event["EventId"])) is not None and record.state == "done"
    )
    assert approved_ids(live) == []
    assert calls(tmp_path)[-1] == f"end recover Reboot {event['EventId']}"
    tried["event vanished while its hook ran"] += 1
