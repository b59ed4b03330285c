"""Fleet coordination end to end: real agent processes, one IMDS emulator that schedules an event
for every VM at once, and Azurite (Microsoft's Azure Storage emulator) holding the group's slots.

What must hold: with one slot, no two VMs are ever between their approval and the end of their
recover hooks together, and every VM gets its turn; a holder restarted mid-event keeps its slot;
with storage gone, nothing is approved early, nothing crashes, and approvals resume when storage
returns. What a holder's death does to its slot is in test_fleet_reboot.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

from agent.state import Store
from tests.agent_harness import calls
from tests.conftest import Emulator, wait_until
from tests.fleet_harness import Azurite, approval_times, fleet_section, free_port
from tests.reliability.agents import AgentProcess, stored_state

LEASE_SECONDS = 15  # Azure's shortest lease


def start_agent(
    agents: dict[str, AgentProcess], root: Path, emulator: Emulator, name: str, **sections: Any
) -> AgentProcess:
    directory = root / name
    directory.mkdir()
    agents[name] = AgentProcess(
        directory,
        emulator.url,
        vm_name=name,
        maintenance={"check_interval_seconds": 0},
        **sections,
    )
    return agents[name]


@dataclass(frozen=True)
class Turn:
    vm: str
    prepared_at: datetime  # its prepare hooks ended: from here on it only waited for a slot
    approved_at: datetime
    recovered_at: datetime

    @property
    def waited(self) -> float:
        return (self.approved_at - self.prepared_at).total_seconds()


def turn_of(directory: Path, vm: str, event_id: str) -> Turn:
    store = Store(directory / "state.db", read_only=True)
    try:
        (approval,) = store.approvals(event_id)
        (prepare,) = store.hook_runs(event_id, "prepare")
        recover = store.hook_runs(event_id, "recover")[-1]
    finally:
        store.close()
    assert approval.outcome == "succeeded" and recover.ended_at and prepare.ended_at
    return Turn(
        vm,
        datetime.fromisoformat(prepare.ended_at),
        datetime.fromisoformat(approval.started_at),
        datetime.fromisoformat(recover.ended_at),
    )


def test_three_agents_sharing_one_slot_take_turns(
    tmp_path: Path, live: Emulator, azurite: Azurite, agents: dict[str, AgentProcess]
) -> None:
    url = azurite.create_container()
    names = ["vm_0", "vm_1", "vm_2"]
    for name in names:
        start_agent(agents, tmp_path, live, name, fleet=fleet_section(url))
        # Recover hooks that take a while: a slot given back before they end would show.
        slow = tmp_path / name / "recover.d" / "20-slow"
        slow.write_text("#!/bin/sh\nsleep 1.5\n")
        slow.chmod(0o755)
    events = {
        name: live.add_event(
            type="Reboot", resources=[name], not_before_in_seconds=900, started_for_seconds=1
        )["EventId"]
        for name in names
    }

    def all_done() -> bool:
        return all(stored_state(tmp_path / n, events[n]) == "done" for n in names)

    wait_until(all_done, timeout=120, interval=0.2)

    turns = sorted(
        (turn_of(tmp_path / name, name, events[name]) for name in names),
        key=lambda turn: turn.approved_at,
    )
    # Never two outstanding: each VM approves only after the previous one recovered.
    for earlier, later in zip(turns, turns[1:]):
        assert later.approved_at > earlier.recovered_at, (earlier, later)
    # Every VM approved once, by its own agent, long before NotBefore.
    approved = [event_id for _, event_id in approval_times(live.url)]
    assert sorted(approved) == sorted(events.values())
    for name in names:
        assert calls(tmp_path / name).count(f"end recover Reboot {events[name]}") == 1
    longest = max(turns, key=lambda turn: turn.waited)
    print("\nfleet run: 3 agents, 1 slot, one Reboot each (NotBefore in 15 min)")
    for turn in turns:
        print(
            f"  {turn.vm}: prepared {turn.prepared_at.time()}, approved {turn.approved_at.time()}"
            f" (waited {turn.waited:.1f} s for the slot), recovered {turn.recovered_at.time()}"
        )
    print(f"  longest wait: {longest.waited:.1f} s ({longest.vm})")
    # Every slot was given back, and status says so, for the group and for this agent.
    shown = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--json", "--config", str(agents["vm_1"].config)],
        capture_output=True,
        text=True,
        check=True,
    )
    fleet = json.loads(shown.stdout)["fleet"]
    assert fleet["group"] == "web" and fleet["slots"] == 1
    assert fleet["slot"] is None and fleet["events"] == []
    assert fleet["holders"] == [
        {
            "name": "web/slot-0",
            "held": False,
            "holder": None,
            "event_id": None,
            "since": None,
            "down_until": None,
        }
    ]


def test_a_holder_restarted_mid_event_keeps_its_slot_until_recovered(
    tmp_path: Path, live: Emulator, azurite: Azurite, agents: dict[str, AgentProcess]
) -> None:
    url = azurite.create_container()
    section = fleet_section(url, lease_seconds=LEASE_SECONDS)
    start_agent(agents, tmp_path, live, "vm_0", fleet=section)
    first = live.add_event(type="Reboot", resources=["vm_0"], not_before_in_seconds=900)
    wait_until(lambda: len(approval_times(live.url)) == 1, timeout=60, interval=0.1)
    # vm_1 arrives while vm_0 is in its maintenance (Started until completed).
    start_agent(agents, tmp_path, live, "vm_1", fleet=section)
    second = live.add_event(type="Reboot", resources=["vm_1"], not_before_in_seconds=900)
    wait_until(
        lambda: "waiting_for_slot" in (tmp_path / "vm_1" / "agent.log").read_text(), timeout=30
    )

    agents["vm_0"].kill()  # and back at once, as systemd would restart it
    lapsed = time.monotonic() + LEASE_SECONDS + 2  # when the old lease would have run out
    agents["vm_0"] = AgentProcess(
        tmp_path / "vm_0",
        live.url,
        vm_name="vm_0",
        maintenance={"check_interval_seconds": 0},
        fleet=section,
    )
    # The assertion is about the time after the lease would have lapsed: wait for that time.
    wait_until(lambda: time.monotonic() > lapsed, timeout=LEASE_SECONDS + 10, interval=0.2)
    # vm_0 took its slot again at start-up, for its event that is not over: vm_1 still waits.
    assert [event_id for _, event_id in approval_times(live.url)] == [first["EventId"]]
    restarted_log = (tmp_path / "vm_0" / "agent.log").read_text().split('"agent.started"')[-1]
    assert "fleet.slot_held_for" in restarted_log
    assert "slot_held_for" not in (tmp_path / "vm_1" / "agent.log").read_text()

    live.control("POST", f"events/{first['EventId']}/complete")
    wait_until(lambda: len(approval_times(live.url)) == 2, timeout=30, interval=0.2)
    assert approval_times(live.url)[1][1] == second["EventId"]
    assert stored_state(tmp_path / "vm_0", first["EventId"]) == "done"


def metric(port: int, name: str) -> float:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_with_storage_gone_nothing_is_approved_early_until_it_returns(
    tmp_path: Path, live: Emulator, azurite: Azurite, agents: dict[str, AgentProcess]
) -> None:
    url = azurite.create_container()
    port = free_port()  # while Azurite still listens: its port must not be picked for metrics
    azurite.stop()
    agent = start_agent(
        agents,
        tmp_path,
        live,
        "vm_0",
        fleet=fleet_section(url),
        metrics={"listen": f"127.0.0.1:{port}"},
    )
    event_id = live.add_event(type="Reboot", resources=["vm_0"], not_before_in_seconds=900)[
        "EventId"
    ]
    errors = 'scheduled_events_agent_fleet_errors_total{backend="blob",reason="unreachable"}'

    def tried(times: int) -> bool:
        try:
            return metric(port, errors) >= times
        except requests.RequestException:
            return False

    # Prepare hooks run at once; then it asks for a slot again and again, and never approves.
    wait_until(lambda: f"end prepare Reboot {event_id}" in calls(tmp_path / "vm_0"), timeout=30)
    wait_until(lambda: tried(5), timeout=30, interval=0.2)
    assert approval_times(live.url) == []
    assert agent.alive()
    log = (tmp_path / "vm_0" / "agent.log").read_text()
    assert log.count('"fleet.unavailable"') == 1  # once per change, not once per attempt
    assert metric(port, "scheduled_events_agent_fleet_slot_held ") == 0

    azurite.start()
    wait_until(lambda: len(approval_times(live.url)) == 1, timeout=30, interval=0.2)
    assert approval_times(live.url)[0][1] == event_id
    assert '"fleet.available"' in (tmp_path / "vm_0" / "agent.log").read_text()
    assert agent.alive()
