"""What a coordinator is to the gate: a backend that hands out, renews and takes back slots,
and the errors and views it answers with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from agent.errors import AgentError


class FleetError(AgentError):
    """A call to the coordinator failed; ``reason`` is one of metrics.FLEET_ERRORS."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Holding:
    """What a held slot is held for, written where the coordinator lets others read it.

    ``down_seconds`` > 0 says: this VM approved (or is about to approve) a maintenance that takes
    it down, so the slot stays its own for that long after its last sign of life, even when the
    lease has lapsed meanwhile; 0 says the slot is free as soon as the lease lapses.
    """

    events: tuple[str, ...]
    since: str
    down_seconds: int = 0


@dataclass(frozen=True)
class Attempt:
    """The outcome of asking for a slot: the slot's name, or None and why not. ``took_over``
    names a holder whose time down had run out when its slot was taken."""

    slot: str | None
    detail: str = ""
    took_over: str | None = None


@dataclass(frozen=True)
class SlotView:
    name: str
    held: bool
    holder: str | None = None
    event_id: str | None = None
    since: str | None = None
    down_until: str | None = None  # held through its holder's maintenance until then (UTC)


@dataclass(frozen=True)
class WaiterView:
    """An agent in line for a slot (blob backend)."""

    holder: str
    not_before: str | None  # the earliest NotBefore of its waiting events (UTC), if any
    waiting_since: str  # storage's time when it joined the line
    fresh: bool  # its heartbeat is recent: it counts


class Backend(Protocol):
    name: str
    slots: int | None  # how many the group has; None: the coordinator keeps the count
    lease_seconds: int | None  # how long a held slot lasts unrenewed; None: until given back

    def acquire(self, holding: Holding, *, not_before: str | None = None) -> Attempt: ...

    def leave_queue(self) -> None: ...

    def queue(self) -> list[WaiterView] | None: ...

    def renew(self, slot: str, holding: Holding) -> bool: ...

    def release(self, slot: str | None) -> None: ...

    def describe(self) -> list[SlotView] | None: ...

    def close(self) -> None: ...
