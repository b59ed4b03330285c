"""The fleet run of ``make bench``: many agents of one group share 2 slots in Azurite.

Each agent is an in-process fleet gate with its own state store, its own blob backend (so its
own storage requests, counted) and its own gate thread, as in the daemon. Each has one Reboot
whose NotBefore is staggered over the next minutes; once its gate says it holds a slot, the
"maintenance" lasts ``work_seconds`` and the agent releases. The bench itself, not the agents,
counts how many are between their grant and their release at once.

It reports the most slots ever held at once (at most 2), the early approvals missed where
capacity allowed, the order of the grants against the deadlines, and storage requests per agent
per minute while waiting, holding and idle.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from agent.clock import SystemClock
from agent.config import FleetConfig
from agent.fleet import BlobSlots, FleetGate, Holding
from agent.metrics import Metrics
from agent.state import Store
from tests.fleet_harness import ACCOUNT_KEY, Azurite

SLOTS = 2
LEASE_SECONDS = 15
RETRY = 5.0  # fleet.retry_seconds as shipped: the figures are those of a default setup


class CountingSlots(BlobSlots):
    """A blob backend that counts its storage requests, by what its agent was doing."""

    def __init__(self, *arguments: Any, **options: Any) -> None:
        super().__init__(*arguments, **options)
        self.phase = "waiting"
        self.requests: dict[str, int] = {"waiting": 0, "holding": 0, "idle": 0}

    def send(self, *arguments: Any, **options: Any) -> Any:
        self.requests[self.phase] += 1
        return super().send(*arguments, **options)


class Member:
    """One agent of the group: its gate, its gate thread, its event."""

    def __init__(self, url: str, name: str, directory: Path, not_before: datetime) -> None:
        self.name = name
        self.not_before = not_before
        self.stop = threading.Event()
        config = FleetConfig(
            url=url, group="bench", slots=SLOTS, lease_seconds=LEASE_SECONDS, retry_seconds=RETRY
        )
        self.backend = CountingSlots(
            url,
            "bench",
            slots=SLOTS,
            lease_seconds=LEASE_SECONDS,
            holder=name,
            account_key=ACCOUNT_KEY,
            heartbeat_seconds=RETRY,
            stop=self.stop,
        )
        self.store = Store(directory / f"{name}.db")
        self.gate = FleetGate(
            self.backend,
            config=config,
            store=self.store,
            metrics=Metrics(CollectorRegistry()),
            clock=SystemClock(self.stop),
            stop=self.stop,
            log=structlog.get_logger("bench"),
        )
        self.changed = threading.Event()
        self.gate.use_own_thread()
        self.gate.on_change = lambda keys: self.changed.set()
        self.thread = threading.Thread(target=self._gate_loop, daemon=True)
        self.granted_at: datetime | None = None
        self.seconds: dict[str, float] = {"waiting": 0.0, "holding": 0.0, "idle": 0.0}

    def _gate_loop(self) -> None:
        while not self.stop.is_set():
            self.gate.tick()
            self.gate.wait(1.0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.gate.close()
        self.store.close()


def measure_fleet(members: int, work_seconds: float, idle_seconds: float) -> dict[str, Any]:
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as scratch:
        azurite = Azurite(Path(scratch) / "azurite").start()
        try:
            return _run(azurite, Path(scratch), members, work_seconds, idle_seconds)
        finally:
            azurite.stop()


def occupy_every_slot(url: str) -> list[BlobSlots]:
    holders = [
        BlobSlots(
            url,
            "bench",
            slots=SLOTS,
            lease_seconds=LEASE_SECONDS,
            holder=f"earlier_{index}",
            account_key=ACCOUNT_KEY,
        )
        for index in range(SLOTS)
    ]
    for backend in holders:
        assert backend.acquire(Holding(("before",), "now")).slot is not None
    return holders


def free_once_all_are_in_line(holders: list[BlobSlots], members: int) -> None:
    deadline = time.monotonic() + 60
    while len(holders[0].queue()) < members and time.monotonic() < deadline:
        time.sleep(0.2)
    for backend in holders:
        backend.release(None)
        backend.close()


def _run(
    azurite: Azurite, scratch: Path, members: int, work_seconds: float, idle_seconds: float
) -> dict[str, Any]:
    url = azurite.create_container("bench")
    chance = random.Random(7)
    start = datetime.now(timezone.utc)
    # Deadlines staggered over two minutes from now: with 2 slots and short maintenances, the
    # group has the capacity to take every VM early, if the earliest deadline goes first.
    group = [
        Member(url, f"vm_{index:02d}", scratch, start + timedelta(seconds=chance.uniform(30, 150)))
        for index in range(members)
    ]
    in_maintenance = 0
    most = 0
    counting = threading.Lock()
    grants: list[tuple[datetime, Member]] = []

    def run(member: Member) -> None:
        nonlocal in_maintenance, most
        began = time.monotonic()
        while not member.gate.hold(
            "e", f"E-{member.name}", event_type="Reboot", not_before=member.not_before
        ):
            member.changed.wait(0.5)
            member.changed.clear()
        member.seconds["waiting"] = time.monotonic() - began
        member.backend.phase = "holding"
        member.granted_at = datetime.now(timezone.utc)
        with counting:
            in_maintenance += 1
            most = max(most, in_maintenance)
            grants.append((member.granted_at, member))
        held = time.monotonic()
        time.sleep(work_seconds)  # the maintenance itself
        with counting:
            in_maintenance -= 1
        member.gate.release("e")
        while member.gate.describe()["slot"] is not None:
            member.changed.wait(0.2)
        member.seconds["holding"] = time.monotonic() - held
        member.backend.phase = "idle"

    # Both slots are busy when the events arrive (the maintenance of two VMs outside the run), so
    # that every agent is in line before the first slot frees: the order is then the line's.
    earlier = occupy_every_slot(url)
    for member in group:
        member.thread.start()
    workers = [threading.Thread(target=run, args=(member,)) for member in group]
    for worker in workers:
        worker.start()
    free_once_all_are_in_line(earlier, members)
    for worker in workers:
        worker.join(timeout=600)
    idle_began = time.monotonic()
    time.sleep(idle_seconds)  # every agent idle: what does it cost storage?
    idle_for = time.monotonic() - idle_began
    for member in group:
        member.close()

    missed = sum(
        1 for member in group if member.granted_at is None or member.granted_at > member.not_before
    )
    # A pair is out of order when one VM got its slot more than a retry before another whose
    # deadline was earlier (two grants within a retry took two slots freed together).
    inversions = sum(
        1
        for first_at, first in grants
        for second_at, second in grants
        if (second_at - first_at).total_seconds() > 1.0 and second.not_before < first.not_before
    )

    def per_minute(phase: str) -> float:
        """Requests per agent-minute spent in ``phase``: all agents' requests over all their
        time in it (an agent that waited a tenth of a second would weigh as much as one that
        waited a minute, were the agents' own rates averaged)."""
        requests = sum(member.backend.requests[phase] for member in group)
        seconds = sum(idle_for if phase == "idle" else member.seconds[phase] for member in group)
        return round(60 * requests / seconds, 1) if seconds > 0 else 0.0

    return {
        "fleet_agents": members,
        "fleet_slots": SLOTS,
        "fleet_most_held_at_once": most,
        "fleet_missed_early_approvals": missed,
        "fleet_order_inversions": inversions,
        "fleet_requests_per_agent_minute_waiting": per_minute("waiting"),
        "fleet_requests_per_agent_minute_holding": per_minute("holding"),
        "fleet_requests_per_agent_minute_idle": per_minute("idle"),
        "grants": [
            {
                "vm": member.name,
                "not_before": member.not_before.isoformat(timespec="seconds"),
                "granted_at": at.isoformat(timespec="seconds"),
            }
            for at, member in sorted(grants, key=lambda pair: pair[0])
        ],
    }
