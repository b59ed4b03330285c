"""The IMDS client against the real emulator over HTTP on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
from typing import Any, Callable

import pytest

from agent.clock import SystemClock
from agent.errors import (
    DocumentError,
    ImdsRequestRejected,
    ImdsResponseInvalid,
    ImdsUnavailable,
    OperationCancelled,
)
from agent.imds import MAX_BODY_BYTES, ImdsClient, RetryPolicy, Timeouts
from tests.conftest import Emulator, wait_until
from tests.fakes import FakeClock

# Short waits so that retries take milliseconds, not seconds.
QUICK = RetryPolicy(budget_seconds=10, initial_wait_seconds=0.01, max_wait_seconds=0.05)


def client_for(emulator: Emulator, **options: Any) -> ImdsClient:
    options.setdefault("retry", QUICK)
    options.setdefault("clock", SystemClock(options.get("stop")))
    return ImdsClient(emulator.url, **options)


def test_fetches_and_parses_the_document(emulator: Emulator) -> None:
    event = emulator.add_event(type="Reboot", description="Host server is undergoing maintenance.")
    document = client_for(emulator).fetch_scheduled_events()
    (only,) = document.events
    assert only.event_id == event["EventId"]
    assert only.description == "Host server is undergoing maintenance."
    assert document.incarnation == emulator.world.incarnation


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_proxies_in_the_environment_are_never_used(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    # A proxy that does not exist: any request sent through it would fail.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]
    monkeypatch.setenv(variable, f"http://127.0.0.1:{dead_port}")
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")
    client = client_for(emulator, retry=RetryPolicy(budget_seconds=0.5))
    assert client.fetch_scheduled_events().events == ()


def test_one_connection_is_reused_across_polls(emulator: Emulator) -> None:
    client = client_for(emulator)
    for _ in range(10):
        client.fetch_scheduled_events()
    client.approve([emulator.add_event(type="Freeze")["EventId"]])
    client.fetch_instance_metadata()
    # The control API call above came on the test's own session: one connection each.
    assert emulator.server.connections == 2


def test_the_first_request_waits_long_for_a_cold_service(
    start_emulator: Callable[..., Emulator],
) -> None:
    emulator = start_emulator(first_call_delay_seconds=1.0)
    client = client_for(emulator, timeouts=Timeouts(read=0.3, first_read=30))
    before = emulator.server.requests
    client.fetch_scheduled_events()
    assert emulator.server.requests - before == 1  # answered, not retried

    # Later requests get the short timeout: the same delay now times out and is retried.
    emulator.control("POST", "faults", {"delay_seconds": 1.0, "count": 1})
    before = emulator.server.requests
    client.fetch_scheduled_events()
    assert emulator.server.requests - before == 2


@pytest.mark.parametrize("status", [404, 410, 429, 500, 502, 503])
def test_transient_statuses_are_retried(emulator: Emulator, status: int) -> None:
    event = emulator.add_event(type="Reboot")
    emulator.control("POST", "faults", {"status": status, "count": 3})
    before = emulator.server.requests
    document = client_for(emulator).fetch_scheduled_events()
    assert document.events[0].event_id == event["EventId"]
    assert emulator.server.requests - before == 4


def test_dropped_connections_are_retried(emulator: Emulator) -> None:
    emulator.control("POST", "faults", {"drop": True, "count": 2})
    assert client_for(emulator).fetch_scheduled_events().events == ()


@pytest.mark.parametrize("status", [400, 401, 403, 405])
def test_other_client_errors_are_raised_at_once(emulator: Emulator, status: int) -> None:
    emulator.control("POST", "faults", {"status": status, "count": 5})
    before = emulator.server.requests
    with pytest.raises(ImdsRequestRejected) as raised:
        client_for(emulator).fetch_scheduled_events()
    assert raised.value.status == status
    assert str(status) in str(raised.value)
    assert emulator.server.requests - before == 1


def test_an_unsupported_api_version_is_a_clear_error(emulator: Emulator) -> None:
    with pytest.raises(ImdsRequestRejected) as raised:
        client_for(emulator, api_version="2099-01-01").fetch_scheduled_events()
    assert raised.value.status == 400
    assert "api-version" in str(raised.value)


def test_retries_stop_at_the_budget(emulator: Emulator) -> None:
    emulator.control("POST", "faults", {"status": 500, "count": 10_000})
    client = client_for(
        emulator,
        retry=RetryPolicy(budget_seconds=0.5, initial_wait_seconds=0.01, max_wait_seconds=0.05),
    )
    with pytest.raises(ImdsUnavailable) as raised:
        client.fetch_scheduled_events()
    assert raised.value.status == 500
    assert raised.value.attempts > 1
    assert "gave up after" in str(raised.value)


def test_an_unreachable_imds_is_reported_after_the_budget() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{unused.getsockname()[1]}"
    client = ImdsClient(
        url,
        clock=SystemClock(),
        retry=RetryPolicy(budget_seconds=0.3, initial_wait_seconds=0.01, max_wait_seconds=0.05),
    )
    with pytest.raises(ImdsUnavailable) as raised:
        client.fetch_scheduled_events()
    assert "connection failed" in str(raised.value)
    assert "imds.url" in str(raised.value)


def test_the_stop_flag_interrupts_a_retry_wait(emulator: Emulator) -> None:
    emulator.control("POST", "faults", {"status": 503, "count": 10_000})
    stop = threading.Event()
    slow = RetryPolicy(budget_seconds=600, initial_wait_seconds=300, max_wait_seconds=300)
    client = client_for(emulator, retry=slow, stop=stop)
    outcome: list[BaseException] = []

    def poll() -> None:
        try:
            client.fetch_scheduled_events()
        except BaseException as error:
            outcome.append(error)

    before = emulator.server.requests
    poller = threading.Thread(target=poll)
    poller.start()
    wait_until(lambda: emulator.server.requests > before)
    stop.set()
    poller.join(timeout=10)
    assert not poller.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], OperationCancelled)


def test_nothing_is_sent_once_stopped(emulator: Emulator) -> None:
    stop = threading.Event()
    stop.set()
    before = emulator.server.requests
    with pytest.raises(OperationCancelled):
        client_for(emulator, stop=stop).fetch_scheduled_events()
    assert emulator.server.requests == before


def test_a_body_that_is_not_json_is_a_document_error_not_retried(emulator: Emulator) -> None:
    emulator.control("POST", "faults", {"body": "<html>proxy error</html>", "count": 1})
    before = emulator.server.requests
    with pytest.raises(DocumentError):
        client_for(emulator).fetch_scheduled_events()
    assert emulator.server.requests - before == 1


def test_an_oversized_body_is_refused(emulator: Emulator) -> None:
    huge = '{"DocumentIncarnation":1,"Events":[],"Padding":"' + "x" * MAX_BODY_BYTES + '"}'
    emulator.control("POST", "faults", {"body": huge, "count": 1})
    with pytest.raises(ImdsResponseInvalid, match="byte limit"):
        client_for(emulator).fetch_scheduled_events()
    assert client_for(emulator).fetch_scheduled_events().events == ()


def test_an_unchanged_document_is_returned_from_the_last_poll(emulator: Emulator) -> None:
    emulator.add_event(type="Reboot")
    client = client_for(emulator)
    first = client.fetch_scheduled_events()
    assert client.fetch_scheduled_events() is first
    emulator.add_event(type="Freeze")
    changed = client.fetch_scheduled_events()
    assert changed is not first
    assert len(changed.events) == 2


def test_without_etags_an_unchanged_document_is_still_recognised(
    start_emulator: Callable[..., Emulator],
) -> None:
    emulator = start_emulator(etag=False)
    client = client_for(emulator)
    first = client.fetch_scheduled_events()
    assert client.fetch_scheduled_events() is first


def test_several_events_are_approved_in_one_post_as_received(emulator: Emulator) -> None:
    lower = emulator.add_event(type="Reboot", event_id="28512af7-c957-4500-9bc4-842d6fb531e4")
    upper = emulator.add_event(type="Freeze")
    client = client_for(emulator)
    client.approve([lower["EventId"], upper["EventId"]], document_incarnation=7)
    approvals = emulator.control("GET", "approvals").json()
    assert [approval["body"] for approval in approvals] == [
        {
            "StartRequests": [{"EventId": lower["EventId"]}, {"EventId": upper["EventId"]}],
            "DocumentIncarnation": 7,
        }
    ]
    assert {event.status for event in client.fetch_scheduled_events().events} == {"Started"}


def test_a_failed_approval_is_retried_and_lands_once(emulator: Emulator) -> None:
    event = emulator.add_event(type="Reboot")
    emulator.control("POST", "faults", {"status": 500, "count": 2})
    client_for(emulator).approve([event["EventId"]])
    assert len(emulator.control("GET", "approvals").json()) == 1


def test_an_approval_refused_by_imds_is_a_clear_error(emulator: Emulator) -> None:
    with pytest.raises(ImdsRequestRejected) as raised:
        client_for(emulator).approve(["00000000-0000-0000-0000-000000000000"])
    assert raised.value.status == 400


def test_approve_needs_an_event_id(emulator: Emulator) -> None:
    with pytest.raises(ValueError, match="at least one"):
        client_for(emulator).approve([])


def test_instance_metadata_gives_the_vm_name_and_its_facts(
    start_emulator: Callable[..., Emulator],
) -> None:
    emulator = start_emulator(
        vm_name="web_9", instance={"platformUpdateDomain": "2", "vmScaleSetName": "web"}
    )
    metadata = client_for(emulator).fetch_instance_metadata()
    assert metadata.name == "web_9"
    assert metadata.platform_update_domain == "2"
    assert metadata.vm_scale_set_name == "web"
    assert metadata.resource_id.endswith("/virtualMachines/web_9")


def test_instance_metadata_that_is_not_json_is_a_clear_error(emulator: Emulator) -> None:
    emulator.control("POST", "faults", {"body": "nope", "count": 1})
    with pytest.raises(ImdsResponseInvalid, match="not JSON"):
        client_for(emulator).fetch_instance_metadata()


def test_instance_metadata_without_a_name_says_to_configure_one(emulator: Emulator) -> None:
    emulator.control("POST", "faults", {"body": '{"compute": {"name": ""}}', "count": 1})
    with pytest.raises(ImdsResponseInvalid, match="vm_name"):
        client_for(emulator).fetch_instance_metadata()


def test_an_incarnation_that_starts_over_is_caught_by_revalidation(emulator: Emulator) -> None:
    # IMDS that was off (24 h without a request) may start its incarnation over: an ETag
    # from before could then match a different document. The client revalidates in full.
    client = client_for(emulator, revalidate_seconds=0.2)
    emulator.add_event(type="Reboot")
    first = client.fetch_scheduled_events()
    with emulator.world.lock:
        emulator.world.incarnation = first.incarnation - 1
    emulator.add_event(type="Freeze")  # back to the same incarnation, different content
    assert client.fetch_scheduled_events().incarnation == first.incarnation
    wait_until(lambda: len(client.fetch_scheduled_events().events) == 2, interval=0.05)


def test_a_failed_request_drops_the_etag(emulator: Emulator) -> None:
    client = client_for(emulator)
    emulator.add_event(type="Reboot")
    first = client.fetch_scheduled_events()
    with emulator.world.lock:
        emulator.world.incarnation = first.incarnation - 1
    emulator.add_event(type="Freeze")
    emulator.control("POST", "faults", {"drop": True, "count": 1})
    assert len(client.fetch_scheduled_events().events) == 2


def test_retry_waits_and_the_budget_run_on_the_injected_clock(emulator: Emulator) -> None:
    # A 30 s budget of retries passes in virtual time: the client waits only through its clock.
    emulator.control("POST", "faults", {"status": 503, "count": 10_000})
    clock = FakeClock()
    client = client_for(
        emulator,
        clock=clock,
        retry=RetryPolicy(budget_seconds=30, initial_wait_seconds=1, max_wait_seconds=4),
    )
    started = clock.monotonic()
    with pytest.raises(ImdsUnavailable) as raised:
        client.fetch_scheduled_events()
    assert raised.value.attempts > 5
    assert sum(clock.waited) == pytest.approx(clock.monotonic() - started)
    assert 20 <= clock.monotonic() - started < 30


def test_the_etag_is_revalidated_in_full_once_the_clock_says_so(emulator: Emulator) -> None:
    clock = FakeClock()
    client = client_for(emulator, clock=clock, revalidate_seconds=60)
    emulator.add_event(type="Reboot")
    first = client.fetch_scheduled_events()
    with emulator.world.lock:
        emulator.world.incarnation = first.incarnation - 1
    emulator.add_event(type="Freeze")  # the same incarnation again, different content
    clock.advance(59)
    assert len(client.fetch_scheduled_events().events) == 1  # the ETag still trusted
    clock.advance(2)
    assert len(client.fetch_scheduled_events().events) == 2  # revalidated in full
