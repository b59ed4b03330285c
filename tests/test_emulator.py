"""The emulator over real HTTP on 127.0.0.1: what README (The emulator) and docs/AZURE.md
sections 1 to 5 say it does."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

from tests.conftest import API, WIRE_ORDER, Emulator

RFC1123 = re.compile(
    r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT$"
)


# The checks every /metadata/ request meets ------------------------------------------------


def test_a_request_without_the_metadata_header_is_refused_with_400(emulator: Emulator) -> None:
    response = emulator.http.get(
        f"{emulator.url}/metadata/scheduledevents", params={"api-version": API}, timeout=5
    )
    assert response.status_code == 400
    assert "metadata header" in response.json()["error"].lower()


def test_the_metadata_header_value_must_be_lower_case_true(emulator: Emulator) -> None:
    assert emulator.scheduled_events(headers={"Metadata": "True"}).status_code == 400
    assert emulator.scheduled_events(headers={"Metadata": "false"}).status_code == 400
    assert emulator.scheduled_events().status_code == 200


def test_a_request_with_x_forwarded_for_is_refused_with_400(emulator: Emulator) -> None:
    response = emulator.scheduled_events(headers={"X-Forwarded-For": "10.0.0.1"})
    assert response.status_code == 400
    assert "x-forwarded-for" in response.json()["error"].lower()


def test_a_request_without_api_version_is_refused_with_400(emulator: Emulator) -> None:
    response = emulator.http.get(
        f"{emulator.url}/metadata/scheduledevents", headers={"Metadata": "true"}, timeout=5
    )
    assert response.status_code == 400
    assert "api-version" in response.json()["error"]


@pytest.mark.parametrize("version", ["2021-02-01", "2099-01-01", "2020-07", "latest"])
def test_an_unknown_api_version_is_refused_with_400(emulator: Emulator, version: str) -> None:
    assert emulator.scheduled_events(api_version=version).status_code == 400


@pytest.mark.parametrize(
    "version",
    ["2017-03-01", "2017-08-01", "2017-11-01", "2019-01-01", "2019-04-01", "2019-08-01", API],
)
def test_every_documented_api_version_is_served(emulator: Emulator, version: str) -> None:
    assert emulator.scheduled_events(api_version=version).status_code == 200


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_verbs_get_405(emulator: Emulator, method: str) -> None:
    response = emulator.http.request(
        method,
        f"{emulator.url}/metadata/scheduledevents",
        params={"api-version": API},
        headers={"Metadata": "true"},
        timeout=5,
    )
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, POST"


def test_post_to_instance_metadata_gets_405(emulator: Emulator) -> None:
    response = emulator.http.post(
        f"{emulator.url}/metadata/instance",
        params={"api-version": "2021-02-01"},
        headers={"Metadata": "true"},
        timeout=5,
    )
    assert response.status_code == 405


# The document ------------------------------------------------------------------------------


def test_the_document_is_compact_json_in_azures_key_order(emulator: Emulator) -> None:
    emulator.add_event(type="Reboot", description="Host server is undergoing maintenance.")
    response = emulator.scheduled_events()
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    body = response.content
    assert not body.endswith(b"\n")
    parsed = json.loads(body)
    assert body == json.dumps(parsed, separators=(",", ":")).encode()
    assert list(parsed) == ["DocumentIncarnation", "Events"]
    assert isinstance(parsed["DocumentIncarnation"], int)
    assert list(parsed["Events"][0]) == WIRE_ORDER
    assert parsed["Events"][0]["ResourceType"] == "VirtualMachine"


def test_not_before_is_an_rfc_1123_date_at_the_types_minimum_notice(emulator: Emulator) -> None:
    notices = {"Freeze": 900, "Reboot": 900, "Redeploy": 600, "Preempt": 30, "Terminate": 300}
    for event_type, seconds in notices.items():
        event = emulator.add_event(type=event_type)
        assert RFC1123.match(event["NotBefore"]), event["NotBefore"]
        notice = parsedate_to_datetime(event["NotBefore"]) - emulator.clock.now()
        assert notice.total_seconds() == seconds


def test_a_notice_is_never_shown_shorter_than_asked(emulator: Emulator) -> None:
    emulator.clock.move(0.4)  # NotBefore has whole seconds: 30 s from x.4 shows as x+31
    event = emulator.add_event(type="Preempt")
    notice = parsedate_to_datetime(event["NotBefore"]) - emulator.clock.now()
    assert 30 <= notice.total_seconds() < 31


def test_fields_appear_only_from_the_api_version_that_introduced_them(emulator: Emulator) -> None:
    emulator.add_event(type="Reboot", description="maintenance", duration_seconds=5)
    expected = {
        "2017-08-01": set(),
        "2019-01-01": set(),
        "2019-04-01": {"Description"},
        "2019-08-01": {"Description", "EventSource"},
        API: {"Description", "EventSource", "DurationInSeconds"},
    }
    for version, optional in expected.items():
        (event,) = emulator.document(version)["Events"]
        assert set(event) - set(WIRE_ORDER[:6]) == optional, version


def test_preempt_and_terminate_are_hidden_from_versions_older_than_them(
    emulator: Emulator,
) -> None:
    emulator.add_event(type="Preempt")
    emulator.add_event(type="Terminate")

    def types(version: str) -> list[str]:
        return [event["EventType"] for event in emulator.document(version)["Events"]]

    assert types("2017-08-01") == []
    assert types("2017-11-01") == ["Preempt"]
    assert types("2019-01-01") == ["Preempt", "Terminate"]


def test_names_carry_a_leading_underscore_before_2017_08_01(emulator: Emulator) -> None:
    emulator.add_event(type="Reboot")
    assert emulator.document("2017-03-01")["Events"][0]["Resources"] == ["_web_4"]
    assert emulator.document("2017-08-01")["Events"][0]["Resources"] == ["web_4"]


def test_unknown_event_types_are_served_as_given(emulator: Emulator) -> None:
    emulator.add_event(type="LiveMigrate")
    assert emulator.document()["Events"][0]["EventType"] == "LiveMigrate"


# Incarnation and ETag ----------------------------------------------------------------------


def test_the_incarnation_changes_on_every_change_of_content_and_only_then(
    emulator: Emulator,
) -> None:
    first = emulator.document()["DocumentIncarnation"]
    assert emulator.document()["DocumentIncarnation"] == first
    event = emulator.add_event(type="Reboot")
    added = emulator.document()["DocumentIncarnation"]
    assert added != first
    assert emulator.document()["DocumentIncarnation"] == added
    assert emulator.approve(event["EventId"]).status_code == 200
    started = emulator.document()["DocumentIncarnation"]
    assert started != added
    # Approving an event that already started changes nothing, so neither does the incarnation.
    assert emulator.approve(event["EventId"]).status_code == 200
    assert emulator.document()["DocumentIncarnation"] == started
    emulator.control("POST", f"events/{event['EventId']}/complete")
    assert emulator.document()["DocumentIncarnation"] not in (first, added, started)


def test_an_etag_is_sent_and_if_none_match_gets_304(emulator: Emulator) -> None:
    response = emulator.scheduled_events()
    etag = response.headers["ETag"]
    assert etag == f'"{response.json()["DocumentIncarnation"]}"'
    unchanged = emulator.scheduled_events(headers={"If-None-Match": etag})
    assert unchanged.status_code == 304
    assert unchanged.content == b""
    emulator.add_event(type="Freeze")
    changed = emulator.scheduled_events(headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.headers["ETag"] != etag


def test_etags_can_be_turned_off(start_emulator: Callable[..., Emulator]) -> None:
    emulator = start_emulator(etag=False)
    response = emulator.scheduled_events()
    assert "ETag" not in response.headers
    incarnation = response.json()["DocumentIncarnation"]
    again = emulator.scheduled_events(headers={"If-None-Match": f'"{incarnation}"'})
    assert again.status_code == 200


# Approval ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", [None, "application/x-www-form-urlencoded", "application/json", "text/plain"]
)
def test_an_approval_is_read_as_json_whatever_its_content_type(
    emulator: Emulator, content_type: str | None
) -> None:
    event = emulator.add_event(type="Reboot")
    body = json.dumps({"StartRequests": [{"EventId": event["EventId"]}]})
    headers = {"Metadata": "true"}
    if content_type:
        headers["Content-Type"] = content_type
    response = emulator.http.post(
        f"{emulator.url}/metadata/scheduledevents",
        params={"api-version": API},
        headers=headers,
        data=body.encode(),
        timeout=5,
    )
    assert response.status_code == 200
    assert emulator.document()["Events"][0]["EventStatus"] == "Started"


def test_an_approval_may_carry_the_document_incarnation(emulator: Emulator) -> None:
    event = emulator.add_event(type="Reboot")
    incarnation = emulator.document()["DocumentIncarnation"]
    body = {"DocumentIncarnation": incarnation, "StartRequests": [{"EventId": event["EventId"]}]}
    response = emulator.http.post(
        f"{emulator.url}/metadata/scheduledevents",
        params={"api-version": API},
        headers={"Metadata": "true"},
        json=body,
        timeout=5,
    )
    assert response.status_code == 200
    assert emulator.control("GET", "approvals").json()[0]["body"] == body


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b"[]",
        b'{"StartRequests": []}',
        b'{"StartRequests": "x"}',
        b'{"StartRequests": [{"Id": "x"}]}',
        b'{"Approve": [{"EventId": "x"}]}',
    ],
)
def test_a_malformed_approval_gets_400_and_is_not_recorded(emulator: Emulator, body: bytes) -> None:
    emulator.add_event(type="Reboot")
    response = emulator.http.post(
        f"{emulator.url}/metadata/scheduledevents",
        params={"api-version": API},
        headers={"Metadata": "true"},
        data=body,
        timeout=5,
    )
    assert response.status_code == 400
    assert emulator.control("GET", "approvals").json() == []
    assert emulator.document()["Events"][0]["EventStatus"] == "Scheduled"


def test_an_approval_of_an_unknown_event_gets_400(emulator: Emulator) -> None:
    response = emulator.approve("00000000-0000-0000-0000-000000000000")
    assert response.status_code == 400
    assert emulator.control("GET", "approvals").json() == []


def test_event_ids_match_whatever_their_case_and_are_kept_as_created(emulator: Emulator) -> None:
    event = emulator.add_event(type="Reboot", event_id="28512af7-c957-4500-9bc4-842d6fb531e4")
    assert emulator.approve(event["EventId"].upper()).status_code == 200
    (started,) = emulator.document()["Events"]
    assert started["EventId"] == "28512af7-c957-4500-9bc4-842d6fb531e4"
    assert started["EventStatus"] == "Started"
    assert started["NotBefore"] == ""


def test_several_events_are_approved_in_one_post_and_recorded_in_order(
    emulator: Emulator,
) -> None:
    first = emulator.add_event(type="Reboot")
    second = emulator.add_event(type="Freeze")
    assert emulator.approve(first["EventId"], second["EventId"]).status_code == 200
    assert emulator.approve(first["EventId"]).status_code == 200
    approvals = emulator.control("GET", "approvals").json()
    assert [approval["body"]["StartRequests"] for approval in approvals] == [
        [{"EventId": first["EventId"]}, {"EventId": second["EventId"]}],
        [{"EventId": first["EventId"]}],
    ]
    assert re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$", approvals[0]["time"])
    assert {event["EventStatus"] for event in emulator.document()["Events"]} == {"Started"}


def test_one_approval_starts_the_event_for_every_vm_in_its_resources(emulator: Emulator) -> None:
    shared = emulator.add_event(type="Reboot", resources=["web_4", "web_5", "web_6"])
    other = emulator.add_event(type="Reboot", resources=["web_5"])
    assert emulator.approve(shared["EventId"]).status_code == 200
    statuses = {event["EventId"]: event["EventStatus"] for event in emulator.document()["Events"]}
    # The whole shared event starts: web_5 and web_6 are released too, ready or not.
    assert statuses == {shared["EventId"]: "Started", other["EventId"]: "Scheduled"}


def test_an_approval_waits_for_the_co_tenants_of_the_host(emulator: Emulator) -> None:
    event = emulator.add_event(type="Reboot", co_tenant_approvals=2)
    before = emulator.document()
    assert emulator.approve(event["EventId"]).status_code == 200
    after = emulator.document()
    assert after == before  # still Scheduled, and the content did not change
    emulator.control("POST", f"events/{event['EventId']}/co-tenant-approve")
    assert emulator.document()["Events"][0]["EventStatus"] == "Scheduled"
    emulator.control("POST", f"events/{event['EventId']}/co-tenant-approve")
    assert emulator.document()["Events"][0]["EventStatus"] == "Started"


def test_co_tenants_alone_do_not_start_an_event_this_vm_has_not_approved(
    emulator: Emulator,
) -> None:
    event = emulator.add_event(type="Reboot", co_tenant_approvals=1)
    emulator.control("POST", f"events/{event['EventId']}/co-tenant-approve")
    assert emulator.document()["Events"][0]["EventStatus"] == "Scheduled"
    emulator.approve(event["EventId"])
    assert emulator.document()["Events"][0]["EventStatus"] == "Started"


# Lifecycle ---------------------------------------------------------------------------------


def test_not_before_passing_starts_the_event_anyway(emulator: Emulator) -> None:
    event = emulator.add_event(type="Reboot", not_before_in_seconds=60, co_tenant_approvals=3)
    emulator.clock.move(59)
    assert emulator.document()["Events"][0]["EventStatus"] == "Scheduled"
    emulator.clock.move(1)
    (started,) = emulator.document()["Events"]
    assert started["EventId"] == event["EventId"]
    assert started["EventStatus"] == "Started"
    assert started["NotBefore"] == ""


def test_a_started_event_is_removed_after_its_impact(emulator: Emulator) -> None:
    event = emulator.add_event(type="Freeze", started_for_seconds=10)
    emulator.approve(event["EventId"])
    emulator.clock.move(9)
    assert emulator.document()["Events"][0]["EventStatus"] == "Started"
    emulator.clock.move(1)
    assert emulator.document()["Events"] == []


def test_a_started_event_without_a_duration_stays_until_completed(emulator: Emulator) -> None:
    event = emulator.add_event(type="Reboot")
    emulator.control("POST", f"events/{event['EventId']}/start")
    emulator.clock.move(7 * 24 * 3600)
    assert emulator.document()["Events"][0]["EventStatus"] == "Started"
    assert emulator.control("POST", f"events/{event['EventId']}/complete").status_code == 200
    assert emulator.document()["Events"] == []


def test_an_event_can_be_created_already_started(emulator: Emulator) -> None:
    event = emulator.add_event(type="Reboot", status="Started", started_for_seconds=30)
    assert event["EventStatus"] == "Started"
    assert event["NotBefore"] == ""
    emulator.clock.move(30)
    assert emulator.document()["Events"] == []


def test_a_cancelled_event_disappears(emulator: Emulator) -> None:
    event = emulator.add_event(type="Redeploy")
    assert emulator.control("DELETE", f"events/{event['EventId']}").status_code == 200
    assert emulator.document()["Events"] == []


def test_state_changes_show_in_the_very_next_request(emulator: Emulator) -> None:
    event = emulator.add_event(type="Preempt", not_before_in_seconds=30, started_for_seconds=5)
    emulator.clock.move(30)
    assert emulator.document()["Events"][0]["EventStatus"] == "Started"
    emulator.clock.move(5)
    assert emulator.document()["Events"] == []
    assert emulator.control("GET", f"events/{event['EventId']}").status_code == 404


# Control API -------------------------------------------------------------------------------


def test_an_added_event_is_answered_as_imds_shows_it(emulator: Emulator) -> None:
    event = emulator.add_event(
        type="Redeploy",
        resources=["web_4", "web_5"],
        not_before="2026-11-26T12:30:00Z",
        source="User",
        description="moving host",
        duration_seconds=0,
    )
    assert re.match(
        r"^[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}$", event["EventId"]
    )
    assert event == {
        "EventId": event["EventId"],
        "EventStatus": "Scheduled",
        "EventType": "Redeploy",
        "ResourceType": "VirtualMachine",
        "Resources": ["web_4", "web_5"],
        "NotBefore": "Thu, 26 Nov 2026 12:30:00 GMT",
        "Description": "moving host",
        "EventSource": "User",
        "DurationInSeconds": 0,
    }
    assert emulator.document()["Events"] == [event]


def test_an_added_event_defaults_to_this_vm_and_the_platform(emulator: Emulator) -> None:
    event = emulator.add_event(type="Freeze")
    assert event["Resources"] == ["web_4"]
    assert event["EventSource"] == "Platform"
    assert event["DurationInSeconds"] == -1
    assert event["Description"] == ""


def test_a_duplicate_event_id_gets_409(emulator: Emulator) -> None:
    emulator.add_event(type="Reboot", event_id="ABC")
    response = emulator.control("POST", "events", {"type": "Freeze", "event_id": "abc"})
    assert response.status_code == 409


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"type": ""},
        {"type": 3},
        {"type": "Reboot", "resources": []},
        {"type": "Reboot", "resources": "web_4"},
        {"type": "Reboot", "status": "Completed"},
        {"type": "Reboot", "not_before": "tomorrow"},
        {"type": "Reboot", "not_before": "2026-11-26T12:00:00Z", "not_before_in_seconds": 5},
        {"type": "Reboot", "duration_seconds": "5"},
        {"type": "Reboot", "co_tenant_approvals": -1},
        {"type": "Reboot", "started_for_seconds": -3},
        {"type": "Reboot", "colour": "blue"},
    ],
)
def test_a_bad_event_body_gets_400_with_the_reason(
    emulator: Emulator, body: dict[str, Any]
) -> None:
    response = emulator.control("POST", "events", body)
    assert response.status_code == 400
    assert response.json()["error"]
    assert emulator.document()["Events"] == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "events/nope"),
        ("DELETE", "events/nope"),
        ("POST", "events/nope/start"),
        ("POST", "events/nope/complete"),
        ("POST", "events/nope/co-tenant-approve"),
        ("GET", "no-such-route"),
    ],
)
def test_unknown_ids_and_routes_get_404(emulator: Emulator, method: str, path: str) -> None:
    assert emulator.control(method, path).status_code == 404


def test_reset_clears_events_faults_and_approvals(emulator: Emulator) -> None:
    event = emulator.add_event(type="Reboot")
    emulator.approve(event["EventId"])
    emulator.control("POST", "faults", {"status": 500, "count": 5})
    assert emulator.control("POST", "reset").status_code == 200
    assert emulator.document()["Events"] == []
    assert emulator.control("GET", "approvals").json() == []


# Faults --------------------------------------------------------------------------------------


def test_a_status_fault_answers_the_next_requests_then_stops(emulator: Emulator) -> None:
    emulator.control("POST", "faults", {"status": 500, "count": 2})
    assert [emulator.scheduled_events().status_code for _ in range(3)] == [500, 500, 200]


def test_faults_apply_before_every_other_check_and_to_every_metadata_path(
    emulator: Emulator,
) -> None:
    emulator.control("POST", "faults", {"status": 410, "count": 3})
    no_header = emulator.http.get(f"{emulator.url}/metadata/scheduledevents", timeout=5)
    instance = emulator.http.get(
        f"{emulator.url}/metadata/instance",
        params={"api-version": "2021-02-01"},
        headers={"Metadata": "true"},
        timeout=5,
    )
    assert no_header.status_code == 410
    assert instance.status_code == 410
    # The control API never meets faults.
    assert emulator.control("GET", "approvals").status_code == 200
    assert emulator.approve("whatever").status_code == 410


def test_a_body_fault_answers_200_with_that_body(emulator: Emulator) -> None:
    emulator.control("POST", "faults", {"body": "not json", "count": 1})
    response = emulator.scheduled_events()
    assert (response.status_code, response.text) == (200, "not json")
    assert emulator.scheduled_events().json()["Events"] == []


def test_a_drop_fault_closes_the_connection_without_an_answer(emulator: Emulator) -> None:
    emulator.control("POST", "faults", {"drop": True, "count": 1})
    with pytest.raises(requests.ConnectionError):
        emulator.scheduled_events()
    assert emulator.scheduled_events().status_code == 200


def test_a_delay_fault_holds_the_answer_back(emulator: Emulator) -> None:
    emulator.control("POST", "faults", {"delay_seconds": 3, "count": 1})
    with pytest.raises(requests.Timeout):
        emulator.http.get(
            f"{emulator.url}/metadata/scheduledevents",
            params={"api-version": API},
            headers={"Metadata": "true"},
            timeout=0.5,
        )
    assert emulator.scheduled_events().status_code == 200


@pytest.mark.parametrize(
    "body", [{}, {"count": 1}, {"status": 99}, {"status": 500, "count": 0}, {"drop": "yes"}]
)
def test_a_bad_fault_gets_400(emulator: Emulator, body: dict[str, Any]) -> None:
    assert emulator.control("POST", "faults", body).status_code == 400
    assert emulator.scheduled_events().status_code == 200


# Rate limit and first call -----------------------------------------------------------------


class FrozenMonotonic:
    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value


def test_more_than_five_requests_in_a_second_get_429(
    start_emulator: Callable[..., Emulator],
) -> None:
    frozen = FrozenMonotonic()
    emulator = start_emulator(rate_limit=5, rate_clock=frozen)
    statuses = [emulator.scheduled_events().status_code for _ in range(4)]
    # A refused request counts too, and so does a POST.
    statuses.append(emulator.scheduled_events(headers={"Metadata": "no"}).status_code)
    statuses.append(emulator.approve("x").status_code)
    assert statuses == [200, 200, 200, 200, 400, 429]
    # The control API is never counted nor limited.
    assert all(emulator.control("GET", "approvals").status_code == 200 for _ in range(10))
    frozen.value += 1.0
    assert emulator.scheduled_events().status_code == 200


def test_the_first_call_can_be_delayed_like_a_cold_imds(
    start_emulator: Callable[..., Emulator],
) -> None:
    emulator = start_emulator(first_call_delay_seconds=3)
    with pytest.raises(requests.Timeout):
        emulator.http.get(
            f"{emulator.url}/metadata/scheduledevents",
            params={"api-version": API},
            headers={"Metadata": "true"},
            timeout=0.5,
        )
    # Only the first call pays it.
    response = emulator.http.get(
        f"{emulator.url}/metadata/scheduledevents",
        params={"api-version": API},
        headers={"Metadata": "true"},
        timeout=2,
    )
    assert response.status_code == 200


def test_one_connection_serves_many_requests(emulator: Emulator) -> None:
    for _ in range(5):
        emulator.scheduled_events()
    assert emulator.server.connections == 1


# The other IMDS endpoints ------------------------------------------------------------------


def test_instance_metadata_gives_compute_name_and_string_values(
    start_emulator: Callable[..., Emulator],
) -> None:
    emulator = start_emulator(vm_name="web_7", instance={"platformUpdateDomain": "3"})
    response = emulator.http.get(
        f"{emulator.url}/metadata/instance",
        params={"api-version": "2021-02-01"},
        headers={"Metadata": "true"},
        timeout=5,
    )
    compute = response.json()["compute"]
    assert compute["name"] == "web_7"
    assert compute["platformUpdateDomain"] == "3"
    for key in (
        "vmId",
        "subscriptionId",
        "resourceGroupName",
        "vmScaleSetName",
        "platformFaultDomain",
        "location",
        "zone",
        "resourceId",
    ):
        assert isinstance(compute[key], str), key
    assert compute["resourceId"].endswith("/virtualMachines/web_7")


def test_instance_metadata_leaves_can_be_read_as_text(emulator: Emulator) -> None:
    response = emulator.http.get(
        f"{emulator.url}/metadata/instance/compute/name",
        params={"api-version": "2021-02-01", "format": "text"},
        headers={"Metadata": "true"},
        timeout=5,
    )
    assert (response.status_code, response.text) == (200, "web_4")


def test_instance_metadata_needs_an_instance_api_version(emulator: Emulator) -> None:
    for params in ({}, {"api-version": "2099-01-01"}):
        response = emulator.http.get(
            f"{emulator.url}/metadata/instance",
            params=params,
            headers={"Metadata": "true"},
            timeout=5,
        )
        assert response.status_code == 400


def test_versions_lists_instance_versions_not_scheduled_events_ones(emulator: Emulator) -> None:
    response = emulator.http.get(
        f"{emulator.url}/metadata/versions", headers={"Metadata": "true"}, timeout=5
    )
    versions = response.json()["apiVersions"]
    assert "2021-02-01" in versions
    assert "2020-07-01" not in versions
    assert "2019-01-01" not in versions


def test_the_identity_endpoint_gives_a_token_with_string_fields(emulator: Emulator) -> None:
    response = emulator.http.get(
        f"{emulator.url}/metadata/identity/oauth2/token",
        params={"api-version": "2018-02-01", "resource": "https://management.azure.com/"},
        headers={"Metadata": "true"},
        timeout=5,
    )
    token = response.json()
    assert response.status_code == 200
    assert token["resource"] == "https://management.azure.com/"
    assert token["token_type"] == "Bearer"
    for key in ("access_token", "expires_in", "expires_on", "not_before"):
        assert isinstance(token[key], str), key
    assert int(token["expires_on"]) > int(token["not_before"])


def test_the_identity_endpoint_needs_a_resource(emulator: Emulator) -> None:
    response = emulator.http.get(
        f"{emulator.url}/metadata/identity/oauth2/token",
        params={"api-version": "2018-02-01"},
        headers={"Metadata": "true"},
        timeout=5,
    )
    assert response.status_code == 400
    assert set(response.json()) == {"error", "error_description"}


def test_unknown_metadata_paths_get_404(emulator: Emulator) -> None:
    response = emulator.http.get(
        f"{emulator.url}/metadata/nothing", headers={"Metadata": "true"}, timeout=5
    )
    assert response.status_code == 404


def test_a_client_that_connects_and_says_nothing_does_not_break_the_server(
    emulator: Emulator,
) -> None:
    host, port = emulator.server.server_address[:2]
    with socket.create_connection((str(host), int(port)), timeout=5):
        pass
    assert emulator.scheduled_events().status_code == 200


# Persistent connections --------------------------------------------------------------------

# Node's keep-alive agent, as Microsoft's own sample uses it: one socket, a request that says
# "Connection: close", then another request through the same agent.
KEEP_ALIVE_CLIENT = r"""
const http = require("http");
const [base, eventId] = process.argv.slice(2);
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
const path = "/metadata/scheduledevents?api-version=2020-07-01";
function send(method, headers, body) {
  return new Promise((resolve, reject) => {
    const request = http.request(base + path, { method, agent, headers }, (response) => {
      let text = "";
      response.on("data", (chunk) => (text += chunk));
      response.on("end", () => resolve(response.statusCode + " " + response.headers.connection));
    });
    request.on("error", reject);
    request.end(body);
  });
}
(async () => {
  const approval = JSON.stringify({ StartRequests: [{ EventId: eventId }] });
  const answers = [];
  answers.push(await send("POST", { Metadata: "true", Connection: "close",
    "Content-Type": "application/json", "Content-Length": Buffer.byteLength(approval) },
    approval));
  answers.push(await send("GET", { Metadata: "true" }));
  answers.push(await send("GET", { Metadata: "true" }));
  console.log(JSON.stringify(answers));
  agent.destroy();
})().catch((error) => { console.error("failed: " + error.message); process.exit(1); });
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js (make test installs it)")
def test_a_keep_alive_client_survives_a_request_that_asked_to_close(
    emulator: Emulator, tmp_path: Path
) -> None:
    event = emulator.add_event(type="Reboot")
    script = tmp_path / "client.js"
    script.write_text(KEEP_ALIVE_CLIENT)
    completed = subprocess.run(
        ["node", str(script), emulator.url, event["EventId"]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    answers = json.loads(completed.stdout)
    assert answers[0] == "200 close"  # the emulator says it closes when it does
    assert [answer.split()[0] for answer in answers[1:]] == ["200", "200"]
    approvals = emulator.control("GET", "approvals").json()
    assert approvals[-1]["body"]["StartRequests"] == [{"EventId": event["EventId"]}]


def test_an_http_1_0_request_is_answered_with_connection_close(emulator: Emulator) -> None:
    with socket.create_connection(("127.0.0.1", emulator.server.server_address[1])) as raw:
        raw.sendall(
            b"GET /metadata/scheduledevents?api-version=2020-07-01 HTTP/1.0\r\n"
            b"Metadata: true\r\n\r\n"
        )
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert b"\r\nconnection: close" in head
