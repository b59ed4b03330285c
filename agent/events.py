"""The Scheduled Events model: parse a document into immutable objects, and write it back.

Pure: no I/O, no clock. Invariants:
- Parsing accepts every variation docs/AZURE.md section 2 lists (optional fields missing, RFC 1123
  or ISO 8601 NotBefore, a weekday that does not match the date, ``""`` NotBefore, EventIds in
  either case, unknown EventTypes and extra keys, integer or numeric-string incarnation).
- One event that cannot be read never hides its siblings: it is kept aside as an
  :class:`UnreadableEvent` (its JSON path, the reason, and its EventId and Resources when those
  can be read), and every well-formed event is parsed. An EventId that appears in two
  entries, readable or not, makes every copy unreadable: which one is meant cannot be known.
  So does nesting more than ``MAX_EVENT_DEPTH`` levels deep (Azure's events are flat).
- Where the meaning is unambiguous, a value is coerced: an integral float (``5.0``) is an
  integer.
- A document that is not one at all (not an object, no ``Events`` list, an incarnation that is
  not an integer from 0 to 2^63-1) raises :class:`~agent.errors.DocumentError`, and only that,
  with the JSON path of the offending part.
- EventIds are kept exactly as received (they are echoed back in approvals) and compared
  case-insensitively through :attr:`ScheduledEvent.key`.
- ``to_wire`` writes an event back with its fields as received, so a well-formed document
  round-trips.
- A document's entries are read when first asked for, each at most once; the events naming
  one VM (``affecting``) or carrying one EventId (``find``) are read without the rest, and get
  the verdicts a whole read gives.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import TypeGuard  # Python 3.10; only a name for the type checker here

from agent.errors import DocumentError

KNOWN_TYPES = ("Freeze", "Reboot", "Redeploy", "Preempt", "Terminate")
SCHEDULED = "Scheduled"
STARTED = "Started"

# The documented keys, in the order Azure writes them on the wire.
_WIRE_ORDER = (
    "EventId",
    "EventStatus",
    "EventType",
    "ResourceType",
    "Resources",
    "NotBefore",
    "Description",
    "EventSource",
    "DurationInSeconds",
)

_MONTHS = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
        start=1,
    )
}
# "Wed, 24 Jan 2018 21:20:44 GMT"; the weekday is optional and never checked against the date,
# because one of Microsoft's documented examples carries the wrong one.
_RFC1123 = re.compile(
    r"^\s*(?:[A-Za-z]{3,9},\s*)?(\d{1,2})\s+([A-Za-z]{3})\s+(\d{4})\s+"
    r"(\d{1,2}):(\d{2}):(\d{2})\s+(?:GMT|UTC|UT|Z|\+0000)\s*$"
)
# "2026-04-29T18:00:00Z", with optional fraction (any number of digits, as .NET writes seven)
# and an optional offset; no offset means UTC.
_ISO8601 = re.compile(
    r"^\s*(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?"
    r"(Z|z|[+-]\d{2}:?\d{2})?\s*$"
)
_DIGITS = re.compile(r"^\s*\d{1,19}\s*$")
# SQLite keeps integers in 64 bits: a larger incarnation is no incarnation Azure would write.
MAX_INCARNATION = 2**63 - 1
# How deep an event's values may nest (the event object is level 1).
MAX_EVENT_DEPTH = 32
_SIGNED_DIGITS = re.compile(r"^\s*-?\d{1,19}\s*$")


def parse_not_before(text: str) -> datetime | None:
    """Read a NotBefore value: ``None`` for ``""``, else an aware UTC datetime.

    Raises ValueError naming the value when it is neither RFC 1123 nor ISO 8601.
    """
    if text.strip() == "":
        return None
    match = _RFC1123.match(text)
    if match:
        day, month_name, year, hour, minute, second = match.groups()
        month = _MONTHS.get(month_name.lower())
        if month is None:
            raise ValueError(f"unknown month {month_name!r} in {text!r}")
        return datetime(
            int(year), month, int(day), int(hour), int(minute), int(second), tzinfo=timezone.utc
        )
    if _ISO8601.match(text):
        return parse_iso8601(text)
    raise ValueError(f"{text!r} is neither an RFC 1123 nor an ISO 8601 date")


def parse_iso8601(text: str) -> datetime:
    """An ISO 8601 date and time in any form Azure writes: seconds and fraction optional (.NET
    writes seven digits, some answers two), ``Z``, ``+hh:mm`` or ``+hhmm``; no zone is UTC.

    An aware UTC datetime; ValueError naming the value when it is not one, or out of range."""
    match = _ISO8601.match(text)
    if not match:
        raise ValueError(f"{text!r} is not an ISO 8601 date and time")
    year, month_text, day, hour, minute, second, fraction, offset = match.groups()
    microsecond = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        moment = datetime(
            int(year),
            int(month_text),
            int(day),
            int(hour),
            int(minute),
            int(second or "0"),
            microsecond,
            tzinfo=timezone.utc,
        )
        if offset and offset not in ("Z", "z"):
            sign = -1 if offset[0] == "-" else 1
            digits = offset[1:].replace(":", "")
            moment -= sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    except (ValueError, OverflowError) as error:
        raise ValueError(f"{text!r} is out of range ({error})") from None
    return moment


@dataclass(frozen=True)
class ScheduledEvent:
    """One event of the document. Optional fields are ``None`` when the document lacks them."""

    event_id: str
    event_type: str
    status: str
    resources: tuple[str, ...]
    not_before: datetime | None
    not_before_text: str | None
    resource_type: str | None = None
    description: str | None = None
    source: str | None = None
    duration_seconds: int | None = None
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def key(self) -> str:
        """The EventId for comparisons: Azure's GUIDs come in either case."""
        return self.event_id.lower()

    @property
    def is_known_type(self) -> bool:
        return self.event_type in KNOWN_TYPES

    def affects(self, vm_name: str) -> bool:
        """True when ``vm_name`` is among Resources (Azure VM names are case-insensitive)."""
        wanted = vm_name.lower()
        return any(_resource_name(name) == wanted for name in self.resources)

    def is_shared_with_others(self, vm_name: str) -> bool:
        """True when Resources names a VM other than ``vm_name``: approving releases them too."""
        wanted = vm_name.lower()
        return any(_resource_name(name) != wanted for name in self.resources)

    def to_wire(self) -> dict[str, Any]:
        """The event as a JSON object, its fields as received, in Azure's key order."""
        wire: dict[str, Any] = {
            "EventId": self.event_id,
            "EventStatus": self.status,
            "EventType": self.event_type,
        }
        if self.resource_type is not None:
            wire["ResourceType"] = self.resource_type
        wire["Resources"] = list(self.resources)
        if self.not_before_text is not None:
            wire["NotBefore"] = self.not_before_text
        if self.description is not None:
            wire["Description"] = self.description
        if self.source is not None:
            wire["EventSource"] = self.source
        if self.duration_seconds is not None:
            wire["DurationInSeconds"] = self.duration_seconds
        wire.update(_thaw(self.extra))
        return wire


@dataclass(frozen=True)
class UnreadableEvent:
    """An entry of ``Events`` that could not be read; what could be read of it is kept."""

    path: str
    reason: str
    event_id: str | None = None
    resources: tuple[str, ...] | None = None

    @property
    def key(self) -> str | None:
        return None if self.event_id is None else self.event_id.lower()

    def may_affect(self, vm_name: str) -> bool:
        """True when its Resources can be read and name ``vm_name``."""
        wanted = vm_name.lower()
        return self.resources is not None and any(
            _resource_name(name) == wanted for name in self.resources
        )

    def signature(self) -> tuple[str, str, str | None]:
        return (self.path, self.reason, self.event_id)


class ScheduledEventsDocument:
    """A whole document: its incarnation, its readable events in the order received, and the
    entries that could not be read.

    Its events are read from the decoded JSON when first asked for, and the events that name
    one VM can be read without the rest (:meth:`affecting`, :meth:`find`): a document that
    carries thousands of other VMs' events does not delay this VM's own. Either way the
    verdict on each entry is the same as reading it whole. Safe to share between threads.
    """

    def __init__(self, incarnation: int, raw_events: list[Any], extra: Mapping[str, Any]) -> None:
        self._incarnation = incarnation
        self._extra = extra
        self._raw = raw_events
        self._lock = threading.Lock()
        self._read: dict[int, ScheduledEvent | UnreadableEvent] = {}
        self._by_key: dict[str, list[int]] | None = None
        self._whole: tuple[tuple[ScheduledEvent, ...], tuple[UnreadableEvent, ...]] | None = None

    @property
    def incarnation(self) -> int:
        return self._incarnation

    @property
    def extra(self) -> Mapping[str, Any]:
        """The document's keys other than DocumentIncarnation and Events."""
        return self._extra

    @property
    def events(self) -> tuple[ScheduledEvent, ...]:
        return self._read_whole()[0]

    @property
    def unreadable(self) -> tuple[UnreadableEvent, ...]:
        return self._read_whole()[1]

    def unreadable_ids(self) -> frozenset[str]:
        """The keys of the unreadable entries whose EventId could be read."""
        return frozenset(entry.key for entry in self.unreadable if entry.key is not None)

    def find(self, event_id: str) -> ScheduledEvent | None:
        """The readable event with this EventId, reading only the entries that carry it."""
        indices = self._keys().get(event_id.lower(), [])
        if len(indices) != 1:
            return None  # two entries carry it, readable or not: neither can be trusted
        found = self._entry(indices[0])
        return found if isinstance(found, ScheduledEvent) else None

    def affecting(self, vm_name: str) -> tuple[ScheduledEvent, ...]:
        """The readable events naming ``vm_name``, reading only the entries that may."""
        whole = self._whole
        if whole is not None:
            return tuple(event for event in whole[0] if event.affects(vm_name))
        wanted = vm_name.lower()
        mine = []
        for index in self._naming(wanted):
            event = self._entry(index)
            if isinstance(event, ScheduledEvent) and self.find(event.event_id) is event:
                mine.append(event)
        return tuple(mine)

    def _naming(self, wanted: str) -> list[int]:
        """The entries whose Resources may name ``wanted``; the EventId index is built in the
        same pass, if it was not yet (one pass over thousands of entries, not two)."""
        where: dict[str, list[int]] | None = {} if self._by_key is None else None
        naming = []
        for index, raw in enumerate(self._raw):
            if not isinstance(raw, dict):
                continue
            if where is not None and _readable_id(event_id := raw.get("EventId")):
                where.setdefault(event_id.lower(), []).append(index)
            names = raw.get("Resources")
            if isinstance(names, list):
                for name in names:
                    if isinstance(name, str) and _resource_name(name) == wanted:
                        naming.append(index)
                        break
        if where is not None:
            with self._lock:
                if self._by_key is None:
                    self._by_key = where
        return naming

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "DocumentIncarnation": self.incarnation,
            "Events": [event.to_wire() for event in self.events],
        }
        wire.update(_thaw(self.extra))
        return wire

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ScheduledEventsDocument):
            return NotImplemented
        return (self.incarnation, self.events, dict(self.extra), self.unreadable) == (
            other.incarnation,
            other.events,
            dict(other.extra),
            other.unreadable,
        )

    __hash__ = None  # type: ignore[assignment]  # equal documents may be read differently

    def __repr__(self) -> str:
        return (
            f"ScheduledEventsDocument(incarnation={self.incarnation}, events={self.events!r}, "
            f"unreadable={self.unreadable!r})"
        )

    # Each part is read at most once, outside the lock (reading is pure), and kept under it:
    # a thread asking for one event never waits while another reads the whole document.

    def _keys(self) -> dict[str, list[int]]:
        """Where each EventId that can be read appears (lower-cased), in readable entries or
        not: an EventId in two entries makes both unreadable, whatever else is wrong."""
        where = self._by_key
        if where is None:
            where = {}
            for index, raw in enumerate(self._raw):
                if isinstance(raw, dict) and _readable_id(event_id := raw.get("EventId")):
                    where.setdefault(event_id.lower(), []).append(index)
            with self._lock:
                if self._by_key is None:
                    self._by_key = where
                where = self._by_key
        return where

    def _entry(self, index: int) -> ScheduledEvent | UnreadableEvent:
        """Entry ``index`` read on its own; the same object every time."""
        entry = self._read.get(index)
        if entry is None:
            raw, path = self._raw[index], f"$.Events[{index}]"
            try:
                entry = _parse_event(raw, path)
            except DocumentError as error:
                entry = _unreadable(raw, error.path, error.reason)
            except RecursionError:  # its extra keys, copied, nest deeper than Python can go
                entry = _unreadable(raw, path, "nested too deeply")
            with self._lock:
                entry = self._read.setdefault(index, entry)
        return entry

    def _read_whole(self) -> tuple[tuple[ScheduledEvent, ...], tuple[UnreadableEvent, ...]]:
        whole = self._whole
        if whole is None:
            whole = self._read_all()
            with self._lock:
                if self._whole is None:
                    self._whole = whole
                whole = self._whole
        return whole

    def _read_all(self) -> tuple[tuple[ScheduledEvent, ...], tuple[UnreadableEvent, ...]]:
        entries = [self._entry(index) for index in range(len(self._raw))]
        where = self._keys()
        events = []
        unreadable = [entry for entry in entries if isinstance(entry, UnreadableEvent)]
        for index, entry in enumerate(entries):
            if not isinstance(entry, ScheduledEvent):
                continue
            copies = where[entry.key]
            if len(copies) == 1:
                events.append(entry)
                continue
            others = ", ".join(f"$.Events[{other}]" for other in copies if other != index)
            unreadable.append(
                UnreadableEvent(
                    f"$.Events[{index}].EventId",
                    f"EventId {entry.event_id!r} repeats {others}",
                    entry.event_id,
                    entry.resources,
                )
            )
        unreadable.sort(key=lambda entry: _index_of(entry.path))
        return tuple(events), tuple(unreadable)


def _readable_id(value: object) -> TypeGuard[str]:
    """An EventId as far as it can be read: a string with more than spaces (a NUL or a lone
    surrogate make the event unreadable, but the EventId is still its name)."""
    return isinstance(value, str) and value.strip() != ""


def _nested_deeper_than(value: object, limit: int) -> bool:
    """Whether a JSON value nests containers more than ``limit`` deep (without recursion)."""
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                pending.append((child, depth + 1))
    return False


def parse_document_bytes(body: bytes | str) -> ScheduledEventsDocument:
    """Parse a response body. Bodies that are not JSON raise DocumentError too."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:
        # UnicodeDecodeError is a ValueError too.
        raise DocumentError(f"body is not JSON ({error})") from None
    return parse_document(data)


def parse_document(data: object) -> ScheduledEventsDocument:
    """Parse an already-decoded JSON value into a document, or raise DocumentError.

    Only the document's frame is checked here; its events are read when first asked for, and
    an event that cannot be read never raises (it is one of ``unreadable``).
    """
    try:
        return _parse_document(data)
    except RecursionError:
        raise DocumentError("nested too deeply") from None


def _parse_document(data: object) -> ScheduledEventsDocument:
    if not isinstance(data, dict):
        raise DocumentError(f"expected a JSON object, got {_json_type(data)}")
    if "DocumentIncarnation" not in data:
        raise DocumentError("missing key", path="$.DocumentIncarnation")
    incarnation = _parse_incarnation(data["DocumentIncarnation"])
    if "Events" not in data:
        raise DocumentError("missing key", path="$.Events")
    raw_events = data["Events"]
    if not isinstance(raw_events, list):
        raise DocumentError(f"expected a list, got {_json_type(raw_events)}", path="$.Events")
    extra = {
        key: value for key, value in data.items() if key not in ("DocumentIncarnation", "Events")
    }
    # The entries are read later, from this copy of the list: ``data`` is the caller's, and
    # must not be changed afterwards.
    return ScheduledEventsDocument(incarnation, list(raw_events), _freeze(extra))


def _index_of(path: str) -> int:
    match = re.match(r"^\$\.Events\[(\d+)\]", path)
    return int(match.group(1)) if match else -1


def _unreadable(raw: object, path: str, reason: str) -> UnreadableEvent:
    """What can still be read of an event that cannot be parsed: its EventId and Resources."""
    event_id = None
    resources = None
    if isinstance(raw, dict):
        value = raw.get("EventId")
        if isinstance(value, str) and value.strip():
            event_id = value
        names = raw.get("Resources")
        if isinstance(names, list) and all(isinstance(name, str) for name in names):
            resources = tuple(names)
    return UnreadableEvent(path, reason, event_id, resources)


def _parse_incarnation(value: object) -> int:
    path = "$.DocumentIncarnation"
    if isinstance(value, bool):
        raise DocumentError("expected an integer, got a boolean", path=path)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and _DIGITS.match(value):
        value = int(value)
    if isinstance(value, int):
        if not 0 <= value <= MAX_INCARNATION:
            raise DocumentError(
                f"expected an integer from 0 to 2^63-1, got {_describe(value)}", path=path
            )
        return value
    raise DocumentError(f"expected an integer, got {_describe(value)}", path=path)


def _parse_event(raw: object, path: str) -> ScheduledEvent:
    if not isinstance(raw, dict):
        raise DocumentError(f"expected an event object, got {_json_type(raw)}", path=path)
    if _nested_deeper_than(raw, MAX_EVENT_DEPTH):
        # Azure's events are flat. Deeper values could be copied here and not in a thread
        # with a deeper stack: the verdict must not depend on where it is reached.
        raise DocumentError(f"nested more than {MAX_EVENT_DEPTH} levels deep", path=path)
    event_id = _required_text(raw, "EventId", path)
    if "\x00" in event_id:
        # Azure's EventIds are GUIDs. A NUL cannot reach a hook's environment, and the state
        # store keeps earlier occurrences under keys holding one.
        raise DocumentError(
            f"expected an EventId without NUL characters, got {_describe(event_id)}",
            path=f"{path}.EventId",
        )
    event_type = _required_text(raw, "EventType", path)
    status = _required_text(raw, "EventStatus", path)
    resources_value = raw.get("Resources")
    if not isinstance(resources_value, list) or not all(
        isinstance(name, str) for name in resources_value
    ):
        raise DocumentError(
            f"expected a list of VM names, got {_describe(resources_value)}",
            path=f"{path}.Resources",
        )
    not_before_text = _optional_text(raw, "NotBefore", path)
    try:
        not_before = None if not_before_text is None else parse_not_before(not_before_text)
    except ValueError as error:
        message = str(error)
        if repr(not_before_text) not in message:
            message = f"{not_before_text!r}: {message}"
        raise DocumentError(message, path=f"{path}.NotBefore") from None
    extra = {key: value for key, value in raw.items() if key not in _WIRE_ORDER}
    return ScheduledEvent(
        event_id=event_id,
        event_type=event_type,
        status=status,
        resources=tuple(resources_value),
        not_before=not_before,
        not_before_text=not_before_text,
        resource_type=_optional_text(raw, "ResourceType", path),
        description=_optional_text(raw, "Description", path),
        source=_optional_text(raw, "EventSource", path),
        duration_seconds=_optional_integer(raw, "DurationInSeconds", path),
        extra=_freeze(extra),
    )


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _required_text(raw: Mapping[str, object], key: str, path: str) -> str:
    if key not in raw:
        raise DocumentError("missing key", path=f"{path}.{key}")
    value = raw[key]
    if not isinstance(value, str) or value.strip() == "":
        raise DocumentError(
            f"expected a non-empty string, got {_describe(value)}", path=f"{path}.{key}"
        )
    if not _utf8(value):  # a lone surrogate ('\ud800' in the JSON) cannot be stored
        raise DocumentError(
            f"expected a string of characters, got one with a lone surrogate: {_describe(value)}",
            path=f"{path}.{key}",
        )
    return value


def _optional_text(raw: Mapping[str, object], key: str, path: str) -> str | None:
    value = raw.get(key)
    if value is None or isinstance(value, str):
        return value
    raise DocumentError(f"expected a string, got {_describe(value)}", path=f"{path}.{key}")


def _optional_integer(raw: Mapping[str, object], key: str, path: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)  # 5.0 means 5: nothing else is meant
    elif isinstance(value, str) and _SIGNED_DIGITS.match(value):
        number = int(value)
    if number is None:
        raise DocumentError(f"expected an integer, got {_describe(value)}", path=f"{path}.{key}")
    if not -(2**63) <= number <= MAX_INCARNATION:
        raise DocumentError(
            f"expected an integer within 64 bits, got {_describe(value)}", path=f"{path}.{key}"
        )
    return number


def _resource_name(name: str) -> str:
    # Before api-version 2017-08-01 the names carried a leading underscore.
    return name.lower().lstrip("_")


def _freeze(value: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(json.loads(json.dumps(value)))


def _thaw(value: Mapping[str, Any]) -> dict[str, Any]:
    thawed: dict[str, Any] = json.loads(json.dumps(dict(value)))
    return thawed


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _describe(value: object) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer too long for Python to print
        text = "(too many digits to show)"
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{_json_type(value)} {text}"
