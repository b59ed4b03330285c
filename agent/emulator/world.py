"""The emulated platform: the events of one host's VMs, their lifecycle, approvals and incarnation.

Invariants (docs/AZURE.md sections 2 to 4):
- State is brought up to date at the start of every request (``advance``), so approval,
  NotBefore passing and the end of an impact show in the very next request: no timer lag.
- The incarnation changes on every change of what a document can show, and only then.
- An EventId keeps its identity from Scheduled to Started; EventIds compare case-insensitively.
- One approval starts the event for every VM in its Resources, unless co-tenants of the host
  still have to approve; NotBefore passing starts it anyway.
- Every method takes the lock: the HTTP server is threaded.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from agent.emulator.wire import (
    FIELD_SINCE,
    TYPE_SINCE,
    UNDERSCORE_NAMES_BEFORE,
    http_date,
    iso_utc,
    version_at_least,
)

# docs/AZURE.md section 4: the minimum notice of each type, the default when none is given.
MINIMUM_NOTICE_SECONDS = {
    "Freeze": 15 * 60,
    "Reboot": 15 * 60,
    "Redeploy": 10 * 60,
    "Preempt": 30,
    "Terminate": 5 * 60,
}
DEFAULT_NOTICE_SECONDS = 15 * 60


def system_now() -> datetime:
    return datetime.now(timezone.utc)


class ControlError(Exception):
    """A control API request the emulator refuses; ``status`` is the HTTP answer to give."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class EmulatedEvent:
    event_id: str
    event_type: str
    resources: list[str]
    status: str
    not_before: datetime | None
    description: str
    source: str
    duration_seconds: int
    started_for_seconds: float | None
    co_tenant_approvals: int
    approved: bool = False
    started_at: datetime | None = None

    def wire(self, api_version: str) -> dict[str, Any]:
        """The event as IMDS shows it to a client of ``api_version``, in Azure's key order."""
        names = self.resources
        if not version_at_least(api_version, UNDERSCORE_NAMES_BEFORE):
            names = [f"_{name}" for name in names]
        shown: dict[str, Any] = {
            "EventId": self.event_id,
            "EventStatus": self.status,
            "EventType": self.event_type,
            "ResourceType": "VirtualMachine",
            "Resources": names,
            "NotBefore": "" if self.not_before is None else http_date(self.not_before),
            "Description": self.description,
            "EventSource": self.source,
            "DurationInSeconds": self.duration_seconds,
        }
        for key, since in FIELD_SINCE.items():
            if not version_at_least(api_version, since):
                del shown[key]
        return shown


@dataclass
class World:
    """Everything the emulated IMDS knows. ``now`` is injectable so tests can move time."""

    vm_name: str = "web_4"
    incarnation: int = 1
    now: Callable[[], datetime] = system_now
    events: list[EmulatedEvent] = field(default_factory=list)
    approvals: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)
    # Called under the lock at each advance; scenarios use it to add their timed steps.
    on_advance: Callable[[World, datetime], None] | None = None

    def advance(self) -> None:
        """Apply everything that is due by now: timed steps, NotBefore passing, impacts ending."""
        with self.lock:
            now = self.now()
            if self.on_advance is not None:
                self.on_advance(self, now)
            for event in list(self.events):
                if (
                    event.status == "Scheduled"
                    and event.not_before is not None
                    and event.not_before <= now
                ):
                    self._start(event, now)
                if (
                    event.status == "Started"
                    and event.started_for_seconds is not None
                    and event.started_at is not None
                    and event.started_at + timedelta(seconds=event.started_for_seconds) <= now
                ):
                    self._remove(event)

    def document(self, api_version: str) -> dict[str, Any]:
        with self.lock:
            visible = [
                event.wire(api_version)
                for event in self.events
                if version_at_least(api_version, TYPE_SINCE.get(event.event_type, ""))
            ]
            return {"DocumentIncarnation": self.incarnation, "Events": visible}

    def add(self, spec: dict[str, Any]) -> EmulatedEvent:
        """Add an event from a control-API body; raises ControlError on a bad one."""
        with self.lock:
            event = self._event_from_spec(spec, self.now())
            if self._find(event.event_id) is not None:
                raise ControlError(409, f"event {event.event_id} already exists")
            self.events.append(event)
            self._changed()
            return event

    def get(self, event_id: str) -> EmulatedEvent:
        with self.lock:
            event = self._find(event_id)
            if event is None:
                raise ControlError(404, f"no event {event_id}")
            return event

    def update(self, event_id: str, spec: dict[str, Any]) -> EmulatedEvent:
        """Change a Scheduled event in place, as Azure may: its type, Resources, NotBefore
        (``not_before: ""`` for none), description or duration. A new incarnation."""
        with self.lock:
            event = self.get(event_id)
            known = {
                "type",
                "resources",
                "not_before",
                "not_before_in_seconds",
                "description",
                "duration_seconds",
            }
            unknown = sorted(set(spec) - known)
            if unknown:
                raise ControlError(400, f"unknown fields: {', '.join(unknown)}")
            if event.status != "Scheduled" and (
                "not_before" in spec or "not_before_in_seconds" in spec
            ):
                raise ControlError(409, f"event {event.event_id} has started: no NotBefore")
            merged = {
                "type": spec.get("type", event.event_type),
                "resources": spec.get("resources", event.resources),
                "description": spec.get("description", event.description),
                "duration_seconds": spec.get("duration_seconds", event.duration_seconds),
            }
            if spec.get("not_before") == "":
                not_before = None
            elif "not_before" in spec or "not_before_in_seconds" in spec:
                merged.update(
                    {
                        key: spec[key]
                        for key in ("not_before", "not_before_in_seconds")
                        if key in spec
                    }
                )
                not_before = self._event_from_spec(merged, self.now()).not_before
            else:
                not_before = event.not_before
            checked = self._event_from_spec(
                {key: value for key, value in merged.items() if not key.startswith("not_before")},
                self.now(),
            )
            event.event_type = checked.event_type
            event.resources = checked.resources
            event.description = checked.description
            event.duration_seconds = checked.duration_seconds
            event.not_before = not_before
            self._changed()
            return event

    def cancel(self, event_id: str) -> None:
        with self.lock:
            self._remove(self.get(event_id))

    def start(self, event_id: str) -> EmulatedEvent:
        with self.lock:
            event = self.get(event_id)
            if event.status != "Started":
                self._start(event, self.now())
            return event

    def complete(self, event_id: str) -> None:
        with self.lock:
            self._remove(self.get(event_id))

    def co_tenant_approve(self, event_id: str) -> EmulatedEvent:
        with self.lock:
            event = self.get(event_id)
            if event.co_tenant_approvals > 0:
                event.co_tenant_approvals -= 1
            if event.status == "Scheduled" and event.approved and event.co_tenant_approvals == 0:
                self._start(event, self.now())
            return event

    def approve_elsewhere(self, event_id: str) -> EmulatedEvent:
        """Approved from outside the VM: released as by an approval POST, none recorded."""
        with self.lock:
            event = self.get(event_id)
            if event.status == "Scheduled":
                event.approved = True
                if event.co_tenant_approvals == 0:
                    self._start(event, self.now())
            return event

    def unknown_ids(self, event_ids: Iterable[str]) -> list[str]:
        with self.lock:
            return [event_id for event_id in event_ids if self._find(event_id) is None]

    def approve(self, event_ids: Iterable[str], body: Any) -> None:
        """Record one accepted approval POST and release each event it names."""
        with self.lock:
            now = self.now()
            for event_id in event_ids:
                event = self._find(event_id)
                if event is None or event.status != "Scheduled":
                    continue  # approving a Started event is accepted and changes nothing
                event.approved = True
                if event.co_tenant_approvals == 0:
                    self._start(event, now)
            self.approvals.append({"time": iso_utc(now), "body": body})

    def reset(self) -> None:
        with self.lock:
            had_events = bool(self.events)
            self.events.clear()
            self.approvals.clear()
            if had_events:
                self._changed()

    def _find(self, event_id: str) -> EmulatedEvent | None:
        wanted = event_id.lower()
        return next((event for event in self.events if event.event_id.lower() == wanted), None)

    def _start(self, event: EmulatedEvent, now: datetime) -> None:
        event.status = "Started"
        event.not_before = None
        event.started_at = now
        self._changed()

    def _remove(self, event: EmulatedEvent) -> None:
        self.events.remove(event)
        self._changed()

    def _changed(self) -> None:
        self.incarnation += 1

    def _event_from_spec(self, spec: dict[str, Any], now: datetime) -> EmulatedEvent:
        known = {
            "type",
            "resources",
            "not_before_in_seconds",
            "not_before",
            "status",
            "source",
            "description",
            "duration_seconds",
            "event_id",
            "started_for_seconds",
            "co_tenant_approvals",
        }
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ControlError(400, f"unknown fields: {', '.join(unknown)}")
        event_type = _text(spec, "type", required=True)
        resources = spec.get("resources", [self.vm_name])
        if (
            not isinstance(resources, list)
            or not resources
            or not all(isinstance(name, str) and name for name in resources)
        ):
            raise ControlError(400, "resources: expected a non-empty list of VM names")
        status = _text(spec, "status") or "Scheduled"
        if status not in ("Scheduled", "Started"):
            raise ControlError(400, f"status: expected Scheduled or Started, got {status!r}")
        not_before = self._not_before(spec, event_type, now)
        started_for = _number(spec, "started_for_seconds")
        co_tenants = spec.get("co_tenant_approvals", 0)
        if not isinstance(co_tenants, int) or isinstance(co_tenants, bool) or co_tenants < 0:
            raise ControlError(400, "co_tenant_approvals: expected an integer >= 0")
        duration = spec.get("duration_seconds", -1)
        if not isinstance(duration, int) or isinstance(duration, bool) or duration < -1:
            raise ControlError(400, "duration_seconds: expected an integer >= -1")
        event = EmulatedEvent(
            event_id=_text(spec, "event_id") or str(uuid.uuid4()).upper(),
            event_type=event_type,
            resources=list(resources),
            status="Scheduled",
            not_before=not_before,
            description=_text(spec, "description"),
            source=_text(spec, "source") or "Platform",
            duration_seconds=duration,
            started_for_seconds=started_for,
            co_tenant_approvals=co_tenants,
        )
        if status == "Started":
            event.status = "Started"
            event.not_before = None
            event.started_at = now
        return event

    def _not_before(self, spec: dict[str, Any], event_type: str, now: datetime) -> datetime:
        if "not_before" in spec and "not_before_in_seconds" in spec:
            raise ControlError(400, "give not_before or not_before_in_seconds, not both")
        if "not_before" in spec:
            text = _text(spec, "not_before")
            try:
                moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
            except ValueError:
                raise ControlError(400, f"not_before: {text!r} is not ISO 8601") from None
            return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
        seconds = _number(spec, "not_before_in_seconds", allow_negative=True)
        if seconds is None:
            seconds = MINIMUM_NOTICE_SECONDS.get(event_type, DEFAULT_NOTICE_SECONDS)
        # IMDS writes whole seconds, and a notice is a minimum: round up, never down, so that
        # "30 s notice" never shows as 29.x s.
        moment = now + timedelta(seconds=seconds)
        if moment.microsecond:
            moment = moment.replace(microsecond=0) + timedelta(seconds=1)
        return moment


def _text(spec: dict[str, Any], key: str, *, required: bool = False) -> str:
    value = spec.get(key)
    if value is None:
        if required:
            raise ControlError(400, f"{key}: required")
        return ""
    if not isinstance(value, str) or (required and not value):
        raise ControlError(400, f"{key}: expected a string, got {value!r}")
    return value


def _number(spec: dict[str, Any], key: str, *, allow_negative: bool = False) -> float | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ControlError(400, f"{key}: expected a number, got {value!r}")
    if value < 0 and not allow_negative:
        raise ControlError(400, f"{key}: expected a number >= 0, got {value!r}")
    return float(value)
