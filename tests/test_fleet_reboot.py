"""Fleet coordination through the reboot itself: real agent processes, the IMDS emulator and
Azurite (or a FleetLock stand-in).

What must hold: a holder that goes down for the maintenance it was approved for keeps its slot
until it is back, has run its recover hooks and has given the slot back, or until
``fleet.max_down_seconds`` pass with no sign of it; a holder down for any other reason (no
approved event outstanding, or one after which the VM does not come back) frees its slot within
the lease; a slot this agent may hold by its records is given back once its events are over,
whatever failed in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.state import Store
from tests.conftest import Emulator, wait_until
from tests.fleet_harness import Azurite, FleetLockServer, approval_times, fleet_section
from tests.reliability.agents import AgentProcess, stored_state
from tests.test_fleet_agents import LEASE_SECONDS, start_agent


def holds_throughout(condition: Callable[[], bool], seconds: float, why: str) -> None:
    """``condition`` holds at every look, twice a second, for ``seconds``: the promise is about
    a span of time, so the test watches all of it."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert condition(), why
        time.sleep(0.5)


def approved(live: Emulator) -> list[str]:
    return [event_id for _, event_id in approval_times(live.url)]


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def restart(
    agents: dict[str, AgentProcess], root: Path, live: Emulator, name: str, **sections: Any
) -> None:
    old = agents[name]
    assert not old.alive()
    old.process.wait(timeout=30)
    old.log.close()
    agents[name] = AgentProcess(
        root / name, live.url, vm_name=name, maintenance={"check_interval_seconds": 0}, **sections
    )


def recovered_at(directory: Path, event_id: str) -> datetime:
    store = Store(directory / "state.db", read_only=True)
    try:
        ended = store.hook_runs(event_id, "recover")[-1].ended_at
    finally:
        store.close()
    assert ended is not None
    return datetime.fromisoformat(ended)


def killed_after_its_approval(
    agents: dict[str, AgentProcess], root: Path, live: Emulator, section: dict[str, Any], kind: str
) -> tuple[str, datetime]:
    """vm_0 takes the slot, approves a ``kind`` event and dies at once, as its reboot takes it
    down (the ``after-approval`` failpoint); vm_1 then wants the slot. vm_0's EventId, and when
    it went down."""
    start_agent(agents, root, live, "vm_0", fleet=section, failpoints="after-approval")
    start_agent(agents, root, live, "vm_1", fleet=section)
    event = live.add_event(type=kind, resources=["vm_0"], not_before_in_seconds=900)["EventId"]
    wait_until(lambda: approved(live) == [event] and not agents["vm_0"].alive(), timeout=60)
    down_at = datetime.now(timezone.utc)
    live.add_event(type="Reboot", resources=["vm_1"], not_before_in_seconds=900)
    wait_until(lambda: "waiting_for_slot" in (root / "vm_1" / "agent.log").read_text(), timeout=30)
    return event, down_at


def test_a_holder_down_for_its_maintenance_keeps_its_slot_until_it_is_back_and_recovered(
    tmp_path: Path, live: Emulator, azurite: Azurite, agents: dict[str, AgentProcess]
) -> None:
    section = fleet_section(azurite.create_container(), lease_seconds=LEASE_SECONDS)
    first, down_at = killed_after_its_approval(agents, tmp_path, live, section, "Reboot")
    # Down for more than three lease times: the lease lapses, the slot stays vm_0's.
    holds_throughout(
        lambda: approved(live) == [first],
        3 * LEASE_SECONDS + 5,
        "another VM was approved while the holder was down for its maintenance",
    )
    live.control("POST", f"events/{first}/complete")  # the maintenance ended while it was down
    back_at = datetime.now(timezone.utc)
    restart(agents, tmp_path, live, "vm_0", fleet=section)
    wait_until(lambda: len(approved(live)) == 2, timeout=60, interval=0.2)
    second_at = when(approval_times(live.url)[1][0])
    recovered = recovered_at(tmp_path / "vm_0", first)
    assert stored_state(tmp_path / "vm_0", first) == "done"
    assert second_at > recovered, "the next VM was approved before the holder had recovered"
    print(
        f"\nreboot of the holder (lease {LEASE_SECONDS} s): down at {down_at.time()}, back at "
        f"{back_at.time()} ({(back_at - down_at).total_seconds():.1f} s down), recovered at "
        f"{recovered.time()}, next VM approved at {second_at.time()}"
    )


def test_a_holder_that_never_comes_back_frees_its_slot_after_max_down_seconds(
    tmp_path: Path, live: Emulator, azurite: Azurite, agents: dict[str, AgentProcess]
) -> None:
    max_down = 25
    section = fleet_section(
        azurite.create_container(), lease_seconds=LEASE_SECONDS, max_down_seconds=max_down
    )
    _, down_at = killed_after_its_approval(agents, tmp_path, live, section, "Redeploy")
    wait_until(lambda: len(approved(live)) == 2, timeout=max_down + 30, interval=0.2)
    after = (when(approval_times(live.url)[1][0]) - down_at).total_seconds()
    # The marker counts from the holder's last sign of life, to the second (storage's clock).
    assert max_down - 3 <= after <= max_down + 15, after
    log = (tmp_path / "vm_1" / "agent.log").read_text()
    assert "fleet.down_holder_expired" in log
    print(
        f"\nholder never back: next VM approved {after:.1f} s after (max_down_seconds {max_down})"
    )


@pytest.mark.parametrize("kind", ["Preempt", "Terminate"])
def test_a_holder_that_is_gone_for_good_frees_its_slot_within_the_lease(
    tmp_path: Path, live: Emulator, azurite: Azurite, agents: dict[str, AgentProcess], kind: str
) -> None:
    section = fleet_section(azurite.create_container(), lease_seconds=LEASE_SECONDS)
    _, down_at = killed_after_its_approval(agents, tmp_path, live, section, kind)
    wait_until(lambda: len(approved(live)) == 2, timeout=LEASE_SECONDS + 20, interval=0.2)
    after = (when(approval_times(live.url)[1][0]) - down_at).total_seconds()
    assert after <= LEASE_SECONDS + 5, after


def test_the_slot_is_kept_settle_seconds_after_the_recover_hooks(
    tmp_path: Path, live: Emulator, azurite: Azurite, agents: dict[str, AgentProcess]
) -> None:
    settle = 12
    section = fleet_section(
        azurite.create_container(), lease_seconds=LEASE_SECONDS, settle_seconds=settle
    )
    start_agent(agents, tmp_path, live, "vm_0", fleet=section)
    start_agent(agents, tmp_path, live, "vm_1", fleet=section)
    first = live.add_event(
        type="Reboot", resources=["vm_0"], not_before_in_seconds=900, started_for_seconds=1
    )["EventId"]
    wait_until(lambda: approved(live) == [first], timeout=60, interval=0.1)
    live.add_event(type="Reboot", resources=["vm_1"], not_before_in_seconds=900)
    wait_until(lambda: len(approved(live)) == 2, timeout=settle + 60, interval=0.2)
    recovered = recovered_at(tmp_path / "vm_0", first)
    gap = (when(approval_times(live.url)[1][0]) - recovered).total_seconds()
    assert settle - 1 <= gap, gap


def test_a_holder_killed_while_it_settles_frees_its_slot_within_the_lease(
    tmp_path: Path, live: Emulator, azurite: Azurite, agents: dict[str, AgentProcess]
) -> None:
    section = fleet_section(
        azurite.create_container(), lease_seconds=LEASE_SECONDS, settle_seconds=600
    )
    start_agent(agents, tmp_path, live, "vm_0", fleet=section)
    start_agent(agents, tmp_path, live, "vm_1", fleet=section)
    first = live.add_event(
        type="Reboot", resources=["vm_0"], not_before_in_seconds=900, started_for_seconds=1
    )["EventId"]
    wait_until(lambda: stored_state(tmp_path / "vm_0", first) == "done", timeout=60)
    live.add_event(type="Reboot", resources=["vm_1"], not_before_in_seconds=900)
    wait_until(
        lambda: "waiting_for_slot" in (tmp_path / "vm_1" / "agent.log").read_text(), timeout=30
    )
    # No approved event outstanding: a death now is not a maintenance, and the slot lapses.
    agents["vm_0"].kill()
    killed = datetime.now(timezone.utc)
    wait_until(lambda: len(approved(live)) == 2, timeout=LEASE_SECONDS + 20, interval=0.2)
    after = (when(approval_times(live.url)[1][0]) - killed).total_seconds()
    assert after <= LEASE_SECONDS + 5, after


def test_a_fleetlock_slot_is_given_back_after_the_reboot_even_if_the_server_was_down(
    tmp_path: Path, live: Emulator, agents: dict[str, AgentProcess]
) -> None:
    server = FleetLockServer(slots=1).start()
    section = {"url": server.url, "backend": "fleetlock", "group": "web", "retry_seconds": 0.2}
    try:
        start_agent(agents, tmp_path, live, "vm_0", fleet=section, failpoints="after-approval")
        event = live.add_event(type="Reboot", resources=["vm_0"], not_before_in_seconds=900)
        wait_until(lambda: not agents["vm_0"].alive(), timeout=60)
        assert server.held("web") == ["vm_0"]
        # It comes back while the FleetLock server is down, and its event has left the document.
        server.refuse_all = True
        live.control("POST", f"events/{event['EventId']}/complete")
        restart(agents, tmp_path, live, "vm_0", fleet=section)
        wait_until(lambda: stored_state(tmp_path / "vm_0", event["EventId"]) == "done", timeout=60)
        assert server.held("web") == ["vm_0"]
        server.refuse_all = False
        wait_until(lambda: server.held("web") == [], timeout=30, interval=0.1)
    finally:
        server.stop()
