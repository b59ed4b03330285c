"""The event model: each variation of docs/AZURE.md section 2 parses; an event that cannot be
read is set aside without hiding its siblings; a body that is no document is a DocumentError."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import DocumentError
from agent.events import (
    ScheduledEventsDocument,
    parse_document,
    parse_document_bytes,
    parse_not_before,
)
from tests.conftest import WIRE_ORDER

# The document of docs/AZURE.md section 2, byte for byte.
SAMPLE = (
    '{"DocumentIncarnation":192,"Events":[{"EventId":"28512AF7-C957-4500-9BC4-842D6FB531E4",'
    '"EventStatus":"Scheduled","EventType":"Reboot","ResourceType":"VirtualMachine",'
    '"Resources":["web_4"],"NotBefore":"Wed, 24 Jan 2018 21:20:44 GMT",'
    '"Description":"Host server is undergoing maintenance.","EventSource":"Platform",'
    '"DurationInSeconds":-1}]}'
)


def event(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "EventId": "28512AF7-C957-4500-9BC4-842D6FB531E4",
        "EventStatus": "Scheduled",
        "EventType": "Reboot",
        "ResourceType": "VirtualMachine",
        "Resources": ["web_4"],
        "NotBefore": "Wed, 24 Jan 2018 21:20:44 GMT",
    }
    base.update(fields)
    return {key: value for key, value in base.items() if value is not None}


def document(*events: dict[str, Any], incarnation: Any = 7) -> dict[str, Any]:
    return {"DocumentIncarnation": incarnation, "Events": list(events)}


def test_the_documented_sample_parses_into_its_fields() -> None:
    parsed = parse_document_bytes(SAMPLE)
    assert parsed.incarnation == 192
    (only,) = parsed.events
    assert only.event_id == "28512AF7-C957-4500-9BC4-842D6FB531E4"
    assert only.status == "Scheduled"
    assert only.event_type == "Reboot"
    assert only.resource_type == "VirtualMachine"
    assert only.resources == ("web_4",)
    assert only.not_before == datetime(2018, 1, 24, 21, 20, 44, tzinfo=timezone.utc)
    assert only.description == "Host server is undergoing maintenance."
    assert only.source == "Platform"
    assert only.duration_seconds == -1


def test_the_documented_sample_round_trips_byte_for_byte() -> None:
    parsed = parse_document_bytes(SAMPLE)
    assert json.dumps(parsed.to_wire(), separators=(",", ":")) == SAMPLE


def test_optional_fields_may_be_missing() -> None:
    (only,) = parse_document(
        document(event(ResourceType=None, NotBefore=None, Description=None))
    ).events
    assert only.description is None
    assert only.source is None
    assert only.duration_seconds is None
    assert only.resource_type is None
    assert only.not_before is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Mon, 19 Sep 2016 18:29:47 GMT", datetime(2016, 9, 19, 18, 29, 47, tzinfo=timezone.utc)),
        # The weekday does not match the date (19 Sep 2016 was a Monday): ignored.
        ("Fri, 19 Sep 2016 18:29:47 GMT", datetime(2016, 9, 19, 18, 29, 47, tzinfo=timezone.utc)),
        ("19 Sep 2016 18:29:47 GMT", datetime(2016, 9, 19, 18, 29, 47, tzinfo=timezone.utc)),
        ("2026-04-29T18:00:00Z", datetime(2026, 4, 29, 18, 0, 0, tzinfo=timezone.utc)),
        (
            "2026-04-29T18:00:00.1234567Z",
            datetime(2026, 4, 29, 18, 0, 0, 123456, tzinfo=timezone.utc),
        ),
        ("2026-04-29T20:00:00+02:00", datetime(2026, 4, 29, 18, 0, 0, tzinfo=timezone.utc)),
        ("2026-04-29T18:00:00", datetime(2026, 4, 29, 18, 0, 0, tzinfo=timezone.utc)),
        ("", None),
    ],
)
def test_not_before_reads_rfc_1123_and_iso_8601(text: str, expected: datetime | None) -> None:
    assert parse_not_before(text) == expected
    (only,) = parse_document(document(event(NotBefore=text))).events
    assert only.not_before == expected
    assert only.not_before_text == text


@pytest.mark.parametrize(
    "text", ["tomorrow", "Mon, 31 Feb 2016 18:29:47 GMT", "2026-13-01T00:00:00Z", "0"]
)
def test_an_unreadable_not_before_names_the_event_and_the_value(text: str) -> None:
    parsed = parse_document(document(event(EventId="A"), event(EventId="B", NotBefore=text)))
    assert [found.event_id for found in parsed.events] == ["A"]
    (unreadable,) = parsed.unreadable
    assert unreadable.path == "$.Events[1].NotBefore"
    assert repr(text) in unreadable.reason
    assert unreadable.event_id == "B"
    assert unreadable.resources == ("web_4",)


def test_event_ids_are_kept_as_received_and_compared_without_case() -> None:
    parsed = parse_document(document(event(EventId="28512af7-c957-4500-9bc4-842d6fb531e4")))
    assert parsed.events[0].event_id == "28512af7-c957-4500-9bc4-842d6fb531e4"
    found = parsed.find("28512AF7-C957-4500-9BC4-842D6FB531E4")
    assert found is parsed.events[0]


def test_the_same_event_id_twice_makes_both_copies_unreadable() -> None:
    parsed = parse_document(
        document(event(EventId="abc"), event(EventId="ABC"), event(EventId="A"))
    )
    assert [found.event_id for found in parsed.events] == ["A"]
    assert [entry.path for entry in parsed.unreadable] == [
        "$.Events[0].EventId",
        "$.Events[1].EventId",
    ]
    assert all("repeats" in entry.reason for entry in parsed.unreadable)
    assert parsed.unreadable_ids() == {"abc"}


def test_a_malformed_sibling_never_hides_this_vms_event() -> None:
    # Seen on a real agent: a float DurationInSeconds on another VM's event blinded it.
    parsed = parse_document(
        document(
            event(EventId="other", Resources=["web_5"], DurationInSeconds=5.0),
            event(EventId="bad", Resources=["web_4"], EventStatus=3),
            event(EventId="mine", Resources=["web_4"]),
        )
    )
    assert [found.event_id for found in parsed.events] == ["other", "mine"]
    other = parsed.find("other")
    assert other is not None and other.duration_seconds == 5
    (bad,) = parsed.unreadable
    assert (bad.path, bad.event_id) == ("$.Events[1].EventStatus", "bad")
    assert bad.may_affect("web_4") and not bad.may_affect("web_5")


@pytest.mark.parametrize("value", [5.5, "5.0", float("inf")])
def test_a_duration_that_is_not_a_whole_number_is_unreadable(value: Any) -> None:
    parsed = parse_document(document(event(DurationInSeconds=value)))
    assert parsed.events == ()
    assert parsed.unreadable[0].path == "$.Events[0].DurationInSeconds"


def test_unknown_event_types_and_extra_keys_are_kept() -> None:
    raw = document(event(EventType="LiveMigrate", Priority="High"))
    raw["Region"] = "westeurope"
    parsed = parse_document(raw)
    (only,) = parsed.events
    assert only.event_type == "LiveMigrate"
    assert not only.is_known_type
    assert only.extra == {"Priority": "High"}
    assert parsed.to_wire() == raw


@pytest.mark.parametrize(("value", "expected"), [(5, 5), ("192", 192), (0, 0)])
def test_the_incarnation_may_be_an_integer_or_a_numeric_string(value: Any, expected: int) -> None:
    assert parse_document(document(incarnation=value)).incarnation == expected


@pytest.mark.parametrize(
    "value", [True, 1.5, "12a", "", -1, None, [1], 2**63, 10**400, str(2**63), "9" * 400]
)
def test_a_bad_incarnation_is_refused(value: Any) -> None:
    # 2^63 crashed the agent in SQLite, a 400-digit one in the metrics: now a poll failure.
    with pytest.raises(DocumentError) as raised:
        parse_document(document(incarnation=value))
    assert raised.value.path == "$.DocumentIncarnation"


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ([], "$"),
        ({"Events": []}, "$.DocumentIncarnation"),
        ({"DocumentIncarnation": 1}, "$.Events"),
        ({"DocumentIncarnation": 1, "Events": {}}, "$.Events"),
    ],
)
def test_what_is_not_a_document_raises_one_error_naming_the_path(raw: Any, path: str) -> None:
    with pytest.raises(DocumentError) as raised:
        parse_document(raw)
    assert raised.value.path == path
    assert str(raised.value).startswith(f"not a Scheduled Events document: {path}: ")


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (document("event"), "$.Events[0]"),
        (document(event(EventId=None)), "$.Events[0].EventId"),
        (document(event(EventId="")), "$.Events[0].EventId"),
        (document(event(EventType=7)), "$.Events[0].EventType"),
        (document(event(EventStatus=None)), "$.Events[0].EventStatus"),
        (document(event(Resources="web_4")), "$.Events[0].Resources"),
        (document(event(Resources=[1])), "$.Events[0].Resources"),
        (document(event(Description=5)), "$.Events[0].Description"),
        (document(event(DurationInSeconds="long")), "$.Events[0].DurationInSeconds"),
        (document(event(DurationInSeconds=True)), "$.Events[0].DurationInSeconds"),
    ],
)
def test_an_event_that_cannot_be_read_is_set_aside_with_its_path(raw: Any, path: str) -> None:
    parsed = parse_document(raw)
    assert parsed.events == ()
    (unreadable,) = parsed.unreadable
    assert unreadable.path == path


@pytest.mark.parametrize("body", [b"", b"not json", b"\xff\xfe", b"{", b"[" * 100_000])
def test_a_body_that_is_not_json_raises_document_error(body: bytes) -> None:
    with pytest.raises(DocumentError):
        parse_document_bytes(body)


def test_events_are_filtered_on_resources_not_on_the_hostname() -> None:
    parsed = parse_document(
        document(
            event(EventId="own", Resources=["web_4"]),
            event(EventId="shared", Resources=["WEB_4", "web_5"]),
            event(EventId="other", Resources=["web_5"]),
            event(EventId="old-style", Resources=["_web_4"]),
        )
    )
    assert [found.event_id for found in parsed.affecting("web_4")] == ["own", "shared", "old-style"]
    shared = parsed.find("shared")
    own = parsed.find("own")
    assert shared is not None and own is not None
    assert shared.is_shared_with_others("web_4")
    assert not own.is_shared_with_others("web_4")


def test_parsed_objects_are_immutable() -> None:
    parsed = parse_document(document(event(Priority="High")))
    with pytest.raises(AttributeError):
        parsed.incarnation = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        parsed.events[0].extra["Priority"] = "Low"  # type: ignore[index]


# Properties --------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
known_keys = st.sampled_from(
    ["EventId", "EventStatus", "EventType", "Resources", "NotBefore", "DurationInSeconds"]
)
# Documents that are nearly right, so the property reaches deep into the parser.
near_documents = st.fixed_dictionaries(
    {
        "DocumentIncarnation": json_values,
        "Events": st.lists(
            st.dictionaries(known_keys | st.text(max_size=8), json_values, max_size=8),
            max_size=3,
        ),
    }
)


@settings(max_examples=300)
@given(json_values | near_documents)
def test_arbitrary_json_raises_nothing_but_document_error(value: Any) -> None:
    try:
        parsed = parse_document(value)
    except DocumentError:
        return
    assert isinstance(parsed, ScheduledEventsDocument)


@settings(max_examples=200)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes_raise_nothing_but_document_error(body: bytes) -> None:
    try:
        parse_document_bytes(body)
    except DocumentError:
        return


weekdays = st.sampled_from(["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"])
months = st.sampled_from(
    ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
)
rfc1123 = st.builds(
    lambda weekday, day, month, year, hour, minute, second: (
        f"{weekday}, {day:02d} {month} {year} {hour:02d}:{minute:02d}:{second:02d} GMT"
    ),
    weekdays,
    st.integers(1, 28),
    months,
    st.integers(2000, 2100),
    st.integers(0, 23),
    st.integers(0, 59),
    st.integers(0, 59),
)
iso8601 = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)).map(
    lambda moment: moment.strftime("%Y-%m-%dT%H:%M:%SZ")
)
guids = st.uuids().map(str) | st.uuids().map(lambda value: str(value).upper())
well_formed_events = st.fixed_dictionaries(
    {
        "EventId": guids,
        "EventStatus": st.sampled_from(["Scheduled", "Started"]),
        "EventType": st.sampled_from(["Freeze", "Reboot", "Redeploy", "Preempt", "Terminate"])
        | st.text(min_size=1, max_size=10).filter(str.strip),
        "ResourceType": st.just("VirtualMachine"),
        "Resources": st.lists(st.text(max_size=15), max_size=3),
        "NotBefore": st.just("") | rfc1123 | iso8601,
    },
    optional={
        "Description": st.text(max_size=40),
        "EventSource": st.sampled_from(["Platform", "User"]),
        "DurationInSeconds": st.integers(-1, 10**6),
    },
).map(lambda raw: {key: raw[key] for key in WIRE_ORDER if key in raw})
well_formed_documents = st.fixed_dictionaries(
    {
        "DocumentIncarnation": st.integers(0, 2**40),
        "Events": st.lists(
            well_formed_events, max_size=5, unique_by=lambda e: e["EventId"].lower()
        ),
    }
)


@settings(max_examples=300)
@given(well_formed_documents)
def test_every_well_formed_document_round_trips(raw: dict[str, Any]) -> None:
    parsed = parse_document(raw)
    wire = parsed.to_wire()
    assert wire == raw
    # Same keys in the same order: Azure's order survives the trip.
    assert [list(written) for written in wire["Events"]] == [list(read) for read in raw["Events"]]
    assert parse_document(json.loads(json.dumps(wire))) == parsed


@pytest.mark.parametrize("value", ["9" * 5000, 2**63, -(2**63) - 1, 1e300])
def test_a_duration_beyond_64_bits_is_unreadable_not_a_crash(value: Any) -> None:
    parsed = parse_document(document(event(DurationInSeconds=value), event(EventId="A")))
    assert [found.event_id for found in parsed.events] == ["A"]
    assert parsed.unreadable[0].path == "$.Events[0].DurationInSeconds"


@pytest.mark.parametrize("event_id", ["E\x001", "\x00"])
def test_an_event_id_with_a_nul_is_unreadable(event_id: str) -> None:
    parsed = parse_document(document(event(EventId=event_id), event(EventId="A")))
    assert [found.event_id for found in parsed.events] == ["A"]
    assert parsed.unreadable[0].path == "$.Events[0].EventId"
