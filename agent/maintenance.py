"""Self-service maintenance, the pure part: weekly slots in a time zone, update-domain spacing,
and the decision to start a maintenance now (docs/AZURE.md section 6).

A slot reads ``Sun 02:00-04:00`` (day, start, end in the configured time zone; an end at or
before the start runs past midnight). A VM in update domain ``d`` takes its turn ``d`` times
the spacing after the slot opens, so the members of a set go one update domain after another
without talking to each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

from agent.arm import MaintenanceStatus, parse_arm_time

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SLOT = re.compile(r"^\s*([A-Za-z]{3})\w*\s+(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True)
class Slot:
    weekday: int  # Monday is 0
    start_minutes: int
    end_minutes: int

    @classmethod
    def parse(cls, text: str) -> Slot:
        match = _SLOT.match(text)
        if not match or match.group(1).lower() not in DAYS:
            raise ValueError(f"{text!r} is not a weekly slot like 'Sun 02:00-04:00'")
        day, start_hour, start_minute, end_hour, end_minute = match.groups()
        start = int(start_hour) * 60 + int(start_minute)
        end = int(end_hour) * 60 + int(end_minute)
        if not (0 <= start < 24 * 60 and 0 < end <= 24 * 60) or int(start_minute) > 59:
            raise ValueError(f"{text!r}: times run from 00:00 to 24:00")
        if end <= start:
            end += 24 * 60  # past midnight
        return cls(DAYS.index(day.lower()), start, end)

    def contains(self, local: datetime) -> bool:
        """Whether ``local`` (in the slot's time zone) falls in this slot this week or the last."""
        minutes = local.weekday() * 24 * 60 + local.hour * 60 + local.minute
        start = self.weekday * 24 * 60 + self.start_minutes
        length = self.end_minutes - self.start_minutes
        week = 7 * 24 * 60
        return (minutes - start) % week < length


def parse_iso(text: str | None) -> datetime | None:
    """A window's time (or one the store wrote); None when there is none."""
    return parse_arm_time(text) if text else None


def window_key(vm_id: str, status: MaintenanceStatus) -> str:
    """The id of the self-service maintenance of this VM in this wave: once per window."""
    return f"self-service:{vm_id}:{status.self_service_start or 'unknown'}"


@dataclass(frozen=True)
class Verdict:
    go: bool
    reason: str


def decide(
    status: MaintenanceStatus | None,
    *,
    now: datetime,
    slots: tuple[Slot, ...],
    zone: tzinfo,
    update_domain: int,
    spacing_minutes: float,
) -> Verdict:
    """Whether to start the self-service maintenance now, and why (not)."""
    if status is None:
        return Verdict(False, "no maintenance planned for this VM")
    if not status.allowed:
        return Verdict(False, "self-service maintenance is not allowed now")
    start = parse_iso(status.self_service_start)
    end = parse_iso(status.self_service_end)
    if start is not None and now < start:
        return Verdict(False, "the self-service window has not opened")
    if end is not None and now >= end:
        return Verdict(False, "the self-service window has closed")
    if not slots:
        return Verdict(False, "no slot configured (maintenance.self_service.slots)")
    # This VM's turn starts update_domain x spacing after the slot opens.
    shifted = (now - timedelta(minutes=update_domain * spacing_minutes)).astimezone(zone)
    if not any(slot.contains(shifted) for slot in slots):
        return Verdict(False, "outside this VM's turn in the configured slots")
    return Verdict(True, f"in a configured slot (update domain {update_domain})")
