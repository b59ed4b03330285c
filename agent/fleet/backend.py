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
class Attempt:
    """The outcome of asking for a slot: the slot's name, or None and why not."""

    slot: str | None
    detail: str = ""


@dataclass(frozen=True)
class SlotView:
    name: str
    held: bool
    holder: str | None = None
    event_id: str | None = None
    since: str | None = None


class Backend(Protocol):
    name: str
    slots: int | None  # how many the group has; None: the coordinator keeps the count
    lease_seconds: int | None  # how long a held slot lasts unrenewed; None: until given back

    def acquire(self, event_id: str, since: str) -> Attempt: ...

    def renew(self, slot: str) -> bool: ...

    def release(self, slot: str | None) -> None: ...

    def describe(self) -> list[SlotView] | None: ...

    def close(self) -> None: ...
