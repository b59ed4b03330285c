"""Self-service maintenance: slots, the emulated ARM, the ARM client's errors, and the whole
flow through the daemon against the emulator (windows read, slot reached, hooks,
performMaintenance, the Redeploy approved, recover), plus each error case."""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable
from zoneinfo import ZoneInfo

import pytest
import structlog
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from agent import selfservice
from agent.arm import PERMISSION, ArmClient, ArmError, MaintenanceStatus, parse_arm_time
from agent.clock import SystemClock
from agent.config import FleetConfig, parse
from agent.daemon import Daemon, assemble
from agent.fleet import FleetGate, FleetLockSlots
from agent.imds import ImdsClient, RetryPolicy
from agent.maintenance import Slot, decide
from agent.metrics import Metrics
from agent.report import status as status_report
from agent.report import status_text
from agent.selfservice import SelfService
from agent.state import Store
from tests.agent_harness import calls, config_for
from tests.conftest import Emulator, approved_ids, wait_until
from tests.fakes import FakeClock
from tests.fleet_harness import FleetLockServer
from tests.standin import StandIn

DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.0000000Z")


def windows(allowed: bool = True, now: datetime | None = None) -> dict[str, Any]:
    """A wave around ``now``: the real time for the end-to-end tests, a fake one for logic."""
    now = datetime.now(timezone.utc) if now is None else now
    return {
        "isCustomerInitiatedMaintenanceAllowed": allowed,
        "preMaintenanceWindowStartTime": iso(now - timedelta(days=1)),
        "preMaintenanceWindowEndTime": iso(now + timedelta(days=34)),
        "maintenanceWindowStartTime": iso(now + timedelta(days=35)),
        "maintenanceWindowEndTime": iso(now + timedelta(days=40)),
        "lastOperationResultCode": "None",
    }


def slot_around_now(minutes: int = 60, now: datetime | None = None) -> str:
    now = datetime.now(timezone.utc) if now is None else now
    start = now - timedelta(minutes=minutes)
    end = now + timedelta(minutes=minutes)
    return f"{DAYS[start.weekday()]} {start:%H:%M}-{end:%H:%M}"


# Slots and the decision ---------------------------------------------------------------------


def test_a_slot_reads_its_day_and_times_and_may_cross_midnight() -> None:
    slot = Slot.parse("Sun 23:00-01:00")
    sunday = datetime(2026, 11, 29, 23, 30)  # a Sunday
    assert slot.contains(sunday)
    assert slot.contains(sunday + timedelta(hours=1))  # Monday 00:30
    assert not slot.contains(sunday + timedelta(hours=2))
    assert not slot.contains(sunday - timedelta(hours=1))


@pytest.mark.parametrize("text", ["Sunday", "Xyz 02:00-04:00", "Sun 25:00-26:00", "Sun 2-4"])
def test_a_bad_slot_is_refused_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match=r"Sun 02:00-04:00|00:00 to 24:00"):
        Slot.parse(text)


def test_update_domains_take_their_turns_one_after_another() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    clock = FakeClock()
    status = MaintenanceStatus.from_view({"maintenanceRedeployStatus": windows(now=clock.now())})
    # A 30-minute slot that began ten minutes ago, Berlin time, on whatever day the clock shows.
    start = (clock.now().astimezone(berlin) - timedelta(minutes=10)).replace(
        second=0, microsecond=0
    )
    end = start + timedelta(minutes=30)
    slots = (Slot.parse(f"{DAYS[start.weekday()]} {start:%H:%M}-{end:%H:%M}"),)

    def go(domain: int) -> bool:
        return decide(
            status,
            now=clock.now(),
            slots=slots,
            zone=berlin,
            update_domain=domain,
            spacing_minutes=30,
        ).go

    assert go(0)
    assert not go(1)  # its turn is the next 30 minutes
    clock.advance(30 * 60)
    assert go(1)
    assert not go(0)  # domain 0's turn is over


def test_no_maintenance_outside_the_window_or_when_not_allowed() -> None:
    now = FakeClock().now()
    slots = (Slot.parse(slot_around_now(now=now)),)
    closed = dict(windows(now=now), preMaintenanceWindowEndTime=iso(now - timedelta(hours=1)))
    cases = {
        "not allowed": windows(allowed=False, now=now),
        "has closed": closed,
    }
    for words, raw in cases.items():
        status = MaintenanceStatus.from_view({"maintenanceRedeployStatus": raw})
        verdict = decide(
            status, now=now, slots=slots, zone=timezone.utc, update_domain=0, spacing_minutes=30
        )
        assert not verdict.go and words in verdict.reason
    assert not decide(
        None, now=now, slots=slots, zone=timezone.utc, update_domain=0, spacing_minutes=0
    ).go


# The emulated ARM and the client ------------------------------------------------------------


@pytest.fixture
def arm_client(live: Emulator) -> Iterator[tuple[ArmClient, str]]:
    imds = ImdsClient(live.url, clock=SystemClock(), retry=RetryPolicy(budget_seconds=2))
    client = ArmClient(live.url, imds, clock=SystemClock())
    resource_id = imds.fetch_instance_metadata().resource_id
    yield client, resource_id
    client.close()
    imds.close()


def test_the_windows_are_read_with_a_cached_token(
    live: Emulator, arm_client: tuple[ArmClient, str]
) -> None:
    client, resource_id = arm_client
    assert client.instance_view(resource_id) is None  # nothing planned yet
    live.control("POST", "arm", {"status": windows()})
    # IMDS fails from now on: the token cached from the first call still serves.
    live.control("POST", "faults", {"status": 500, "count": 1000})
    status = client.instance_view(resource_id)
    assert status is not None and status.allowed
    assert status.scheduled_start is not None


def test_arm_wants_a_bearer_token(live: Emulator) -> None:
    response = live.http.get(
        f"{live.url}/subscriptions/x/instanceView",
        params={"api-version": "2025-04-01"},
        timeout=5,
    )
    assert response.status_code == 401


def test_perform_maintenance_is_followed_to_its_end_and_a_redeploy_follows(
    live: Emulator, arm_client: tuple[ArmClient, str]
) -> None:
    client, resource_id = arm_client
    live.control("POST", "arm", {"status": windows(), "operation_polls": 2})
    operation = client.perform_maintenance(resource_id)
    assert operation is not None
    assert [client.operation_status(operation) for _ in range(3)] == [
        "InProgress",
        "InProgress",
        "Succeeded",
    ]
    (redeploy,) = live.control("GET", "events").json()["Events"]
    assert redeploy["EventType"] == "Redeploy"
    view = client.instance_view(resource_id)
    assert view is not None and not view.allowed and view.last_result == "MaintenanceCompleted"


@pytest.mark.parametrize(
    ("setup", "cause", "words"),
    [
        ({"identity": False}, "no_identity", "az vm identity assign"),
        ({"error": {"status": 403}}, "forbidden", PERMISSION),
        ({"error": {"status": 429, "retry_after": 7}}, "throttled", "7 s"),
        ({"error": {"status": 500}}, "http_500", "500"),
    ],
)
def test_arm_errors_name_the_cause_and_the_fix(
    live: Emulator,
    arm_client: tuple[ArmClient, str],
    setup: dict[str, Any],
    cause: str,
    words: str,
) -> None:
    client, resource_id = arm_client
    live.control("POST", "arm", setup)
    with pytest.raises(ArmError) as raised:
        client.instance_view(resource_id)
    assert raised.value.cause == cause
    assert words in str(raised.value)
    if cause == "throttled":
        assert raised.value.retry_after == 7


def test_performing_when_not_allowed_is_refused(
    live: Emulator, arm_client: tuple[ArmClient, str]
) -> None:
    client, resource_id = arm_client
    live.control("POST", "arm", {"status": windows(allowed=False)})
    with pytest.raises(ArmError) as raised:
        client.perform_maintenance(resource_id)
    assert raised.value.cause == "not_allowed"
    assert "OperationNotAllowed" in str(raised.value)


def test_arm_unreachable_says_so(emulator: Emulator) -> None:
    imds = ImdsClient(emulator.url, clock=SystemClock())  # a token comes: ARM is unreachable
    client = ArmClient("http://127.0.0.1:9", imds, clock=SystemClock())
    with pytest.raises(ArmError) as raised:
        client.instance_view("/subscriptions/x")
    assert raised.value.cause == "unreachable"
    client.close()
    imds.close()


# The whole flow through the daemon ---------------------------------------------------------


class Agent:
    def __init__(
        self,
        directory: Path,
        url: str,
        dry_run: bool = False,
        fleetlock: str | None = None,
        **self_service: Any,
    ):
        settings = {
            "enabled": True,
            "slots": [slot_around_now()],
            "time_zone": "UTC",
            "update_domain_spacing_minutes": 30,
            **self_service,
        }
        data = config_for(
            directory, url, maintenance={"check_interval_seconds": 0.5, "self_service": settings}
        )
        self.config = parse(data)
        self.stop = threading.Event()
        self.clock = SystemClock(self.stop)
        self.imds = ImdsClient(
            url, clock=self.clock, stop=self.stop, retry=RetryPolicy(2, 0.02, 0.1)
        )
        self.arm = ArmClient(url, self.imds, clock=self.clock)
        self.store = Store(":memory:" if dry_run else self.config.state.path)
        self.registry = CollectorRegistry()
        metrics = Metrics(self.registry)
        self.fleet: FleetGate | None = None
        if fleetlock is not None:
            self.fleet = FleetGate(
                FleetLockSlots(fleetlock, "web", holder="web_4"),
                config=FleetConfig(url=fleetlock, backend="fleetlock", retry_seconds=0.2),
                store=self.store,
                metrics=metrics,
                clock=self.clock,
                stop=self.stop,
                log=structlog.get_logger(),
            )
        self_service = SelfService(
            config=self.config,
            arm=self.arm,
            instance=self.imds.fetch_instance_metadata(),
            store=self.store,
            metrics=metrics,
            clock=self.clock,
            stop=self.stop,
            log=structlog.get_logger(),
            dry_run=dry_run,
            fleet=self.fleet,
        )
        self.daemon = Daemon(
            assemble(
                self.config,
                imds=self.imds,
                store=self.store,
                clock=self.clock,
                stop=self.stop,
                log=structlog.get_logger(),
                vm_name="web_4",
                dry_run=dry_run,
                metrics=metrics,
                fleet=self.fleet,
            ),
            self_service=self_service,
        )
        self.thread = threading.Thread(target=self.daemon.run)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.store.close()
        self.arm.close()
        self.imds.close()
        if self.fleet is not None:
            self.fleet.close()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    running: list[Agent] = []
    yield running
    for agent in running:
        agent.close()


def performed(emulator: Emulator) -> int:
    count: int = emulator.control("GET", "arm").json()["performed"]
    return count


def self_service_record(agent: Agent) -> Any:
    found = [r for r in agent.store.events() if r.key.startswith("self-service:")]
    return found[0] if found else None


def test_a_full_self_service_maintenance(
    live: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    live.control("POST", "arm", {"status": windows(), "operation_polls": 1})
    agents.append(agent := Agent(tmp_path, live.url))
    wait_until(lambda: performed(live) == 1, timeout=30)
    # The Redeploy that follows is prepared and approved as any event, then ends.
    wait_until(
        lambda: any(
            request["EventId"]
            for approval in live.control("GET", "approvals").json()
            for request in approval["body"]["StartRequests"]
        ),
        timeout=30,
    )
    wait_until(
        lambda: (r := self_service_record(agent)) is not None and r.state == "done", timeout=30
    )
    record = self_service_record(agent)
    assert record.decision == "performMaintenance Succeeded"
    lines = calls(tmp_path)
    assert lines[0].startswith("start prepare PerformMaintenance self-service:")
    assert any(line.startswith("end prepare Redeploy") for line in lines)
    assert any(line.startswith("end recover PerformMaintenance") for line in lines)
    assert (
        agent.registry.get_sample_value(
            "scheduled_events_agent_self_service_maintenances_total", {"outcome": "succeeded"}
        )
        == 1
    )
    text = status_text(status_report(agent.store))
    assert "self-service window:" in text and "MaintenanceCompleted" in text
    start = agent.registry.get_sample_value(
        "scheduled_events_agent_maintenance_window_start_timestamp_seconds",
        {"window": "scheduled"},
    )
    assert start is not None and start > datetime.now(timezone.utc).timestamp()


def test_with_fleet_coordination_it_waits_for_a_slot_and_holds_it_to_the_end(
    live: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    server = FleetLockServer(slots=1).start()
    server.holders["web"] = ["web_5"]  # another VM of the group is in maintenance
    try:
        live.control("POST", "arm", {"status": windows(), "operation_polls": 1})
        agents.append(agent := Agent(tmp_path, live.url, fleetlock=server.url))
        wait_until(
            lambda: len([r for r in server.requests if r["path"] == "/v1/pre-reboot"]) >= 3,
            timeout=30,
        )
        assert performed(live) == 0 and calls(tmp_path) == []  # not even its prepare hooks
        server.holders["web"] = []  # web_5 is done
        wait_until(lambda: performed(live) == 1, timeout=30)
        assert server.held("web") == ["web_4"]
        wait_until(
            lambda: (r := self_service_record(agent)) is not None and r.state == "done",
            timeout=30,
        )
        # The Redeploy that followed was approved under the same slot, given back at the end.
        assert approved_ids(live)
        wait_until(lambda: server.held("web") == [], timeout=10)
    finally:
        server.stop()


def test_never_twice_in_one_window_whatever_restarts(
    live: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    wave = windows()
    live.control("POST", "arm", {"status": wave})
    first = Agent(tmp_path, live.url)
    wait_until(lambda: performed(live) == 1, timeout=30)
    wait_until(
        lambda: (r := self_service_record(first)) is not None and r.state == "done", timeout=30
    )
    first.close()
    live.control("POST", "arm", {"status": wave})  # allowed again, the same window
    agents.append(second := Agent(tmp_path, live.url))
    wait_until(
        lambda: second.daemon.self_service is not None and second.daemon.self_service._checked,
        timeout=10,
    )
    assert performed(live) == 1


def test_a_failed_prepare_hook_means_no_maintenance_and_recover(
    live: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    (tmp_path / "fail-prepare-PerformMaintenance").touch()
    live.control("POST", "arm", {"status": windows()})
    agents.append(agent := Agent(tmp_path, live.url))
    wait_until(
        lambda: (r := self_service_record(agent)) is not None and r.state == "done", timeout=30
    )
    assert performed(live) == 0
    assert "prepare hooks failed" in self_service_record(agent).decision
    assert any(line.startswith("end recover PerformMaintenance") for line in calls(tmp_path))


def test_a_failed_operation_is_recorded_and_recovered(
    live: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    live.control("POST", "arm", {"status": windows(), "operation_outcome": "Failed"})
    agents.append(agent := Agent(tmp_path, live.url))
    wait_until(
        lambda: (r := self_service_record(agent)) is not None and r.state == "done", timeout=30
    )
    assert self_service_record(agent).decision == "performMaintenance Failed"
    assert live.control("GET", "events").json()["Events"] == []


def test_not_allowed_at_the_last_moment_is_recorded_and_recovered(
    live: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    # The window read says allowed, but Azure has changed its mind: performMaintenance gets 409.
    # The window read comes first: let it through, then queue the 409 for the POST.
    live.control("POST", "arm", {"status": windows()})
    (tmp_path / "block-prepare-PerformMaintenance").touch()
    agents.append(agent := Agent(tmp_path, live.url))
    wait_until((tmp_path / "pid-prepare-PerformMaintenance").exists, timeout=30)
    live.control("POST", "arm", {"error": {"status": 409, "count": 1}})
    (tmp_path / "block-prepare-PerformMaintenance").unlink()
    wait_until(
        lambda: (r := self_service_record(agent)) is not None and r.state == "done", timeout=30
    )
    assert "OperationNotAllowed" in self_service_record(agent).decision
    assert performed(live) == 0


def test_outside_this_vms_turn_nothing_happens(
    start_emulator: Callable[..., Emulator], tmp_path: Path, agents: list[Agent]
) -> None:
    emulator = start_emulator(real_time=True, instance={"platformUpdateDomain": "3"})
    emulator.control("POST", "arm", {"status": windows()})
    agents.append(agent := Agent(tmp_path, emulator.url, update_domain_spacing_minutes=60))
    wait_until(
        lambda: agent.daemon.self_service is not None and agent.daemon.self_service._checked,
        timeout=10,
    )
    assert performed(emulator) == 0
    assert self_service_record(agent) is None


def test_a_dry_run_calls_nothing(live: Emulator, tmp_path: Path, agents: list[Agent]) -> None:
    live.control("POST", "arm", {"status": windows()})
    with capture_logs() as logs:
        agents.append(agent := Agent(tmp_path, live.url, dry_run=True))
        wait_until(lambda: self_service_record(agent) is not None, timeout=10)
    assert performed(live) == 0
    assert calls(tmp_path) == []
    assert "maintenance.would_perform" in [log["event"] for log in logs]


@pytest.mark.parametrize(
    ("setup", "cause"),
    [({"identity": False}, "no_identity"), ({"error": {"status": 403, "count": 100}}, "forbidden")],
)
def test_window_read_errors_are_logged_once_with_cause(
    live: Emulator, tmp_path: Path, agents: list[Agent], setup: dict[str, Any], cause: str
) -> None:
    live.control("POST", "arm", setup)
    with capture_logs() as logs:
        agents.append(agent := Agent(tmp_path, live.url))
        wait_until(
            lambda: (
                (
                    agent.registry.get_sample_value(
                        "scheduled_events_agent_maintenance_check_errors_total", {"cause": cause}
                    )
                    or 0
                )
                >= 2
            ),
            timeout=10,
        )
    failures = [log for log in logs if log["event"] == "maintenance.check_failed"]
    assert len(failures) == 1
    assert failures[0]["cause"] == cause


# ARM's time forms ----------------------------------------------------------------------------

ARM_TIME_FORMS = {
    "seven_digit_fraction": "%Y-%m-%dT%H:%M:%S.0000000Z",
    "minutes_only": "%Y-%m-%dT%H:%MZ",
    "two_digit_fraction": "%Y-%m-%dT%H:%M:%S.25Z",
    "offset_with_colon": "%Y-%m-%dT%H:%M:%S+00:00",
    "offset_without_colon": "%Y-%m-%dT%H:%M:%S+0000",
    "no_zone": "%Y-%m-%dT%H:%M:%S",
}


@pytest.mark.parametrize("form", sorted(ARM_TIME_FORMS))
def test_every_iso_form_arm_writes_is_read_the_same(form: str) -> None:
    moment = datetime(2027, 1, 2, 3, 4, tzinfo=timezone.utc)
    parsed = parse_arm_time(moment.strftime(ARM_TIME_FORMS[form]))
    assert abs((parsed - moment).total_seconds()) < 1
    assert parsed.tzinfo is not None


@pytest.mark.parametrize(
    "text",
    ["tomorrow", "2027-13-02T00:00Z", "2027-01-02", "2027-01-02T25:00Z", "2027-01-02T00:00Z\x00"],
)
def test_a_time_arm_should_never_write_is_refused_by_name(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_arm_time(text)


@pytest.mark.parametrize("form", ["minutes_only", "two_digit_fraction", "offset_without_colon"])
def test_a_maintenance_taken_in_any_arm_time_form_is_stored_readably(
    live: Emulator, tmp_path: Path, agents: list[Agent], form: str
) -> None:
    now = datetime.now(timezone.utc)
    wave = windows()
    for key in ("preMaintenanceWindowStartTime", "preMaintenanceWindowEndTime"):
        wave[key] = parse_arm_time(wave[key]).strftime(ARM_TIME_FORMS[form])
    wave["maintenanceWindowStartTime"] = (now + timedelta(days=35)).strftime(ARM_TIME_FORMS[form])
    live.control("POST", "arm", {"status": wave, "operation_polls": 1})
    agents.append(agent := Agent(tmp_path, live.url))
    wait_until(
        lambda: (r := self_service_record(agent)) is not None and r.state == "done", timeout=30
    )
    # What was stored reads back, in this process and in a new one (status, history, run).
    reader = Store(agent.config.state.path, read_only=True)
    try:
        assert [r.key for r in reader.events() if r.key.startswith("self-service:")]
        assert "self-service window:" in status_text(status_report(reader))
    finally:
        reader.close()


@pytest.mark.parametrize(
    "value",
    ["2027-01-02T00:00:00.25Zulu", "soon", 20270102, {"at": "2027"}, "9999-12-31T23:59:59-01:00"],
)
def test_a_window_time_that_cannot_be_read_is_a_failed_check_not_a_stored_row(
    live: Emulator, tmp_path: Path, agents: list[Agent], value: Any
) -> None:
    wave = windows()
    wave["maintenanceWindowStartTime"] = value
    live.control("POST", "arm", {"status": wave, "operation_polls": 1})
    with capture_logs() as logs:
        agents.append(agent := Agent(tmp_path, live.url))
        wait_until(
            lambda: (
                (
                    agent.registry.get_sample_value(
                        "scheduled_events_agent_maintenance_check_errors_total",
                        {"cause": "bad_answer"},
                    )
                    or 0
                )
                >= 2
            ),
            timeout=10,
        )
        failures = [log for log in logs if log["event"] == "maintenance.check_failed"]
        assert failures and "maintenanceWindowStartTime" in failures[0]["reason"]
        assert self_service_record(agent) is None and performed(live) == 0
        # The watcher lives on: once ARM answers sensibly, the maintenance is taken.
        live.control("POST", "arm", {"status": windows(), "operation_polls": 1})
        wait_until(lambda: performed(live) == 1, timeout=30)


@pytest.mark.parametrize("domain", ["\u00b2", "1" * 5000, "-1", ""])
def test_an_update_domain_that_is_no_small_number_counts_as_domain_0(
    live: Emulator, tmp_path: Path, domain: str
) -> None:
    stop = threading.Event()
    imds = ImdsClient(live.url, clock=SystemClock(stop), retry=RetryPolicy(budget_seconds=2))
    arm = ArmClient(live.url, imds, clock=SystemClock(stop))
    instance = dataclasses.replace(imds.fetch_instance_metadata(), platform_update_domain=domain)
    store = Store(":memory:")
    try:
        service = SelfService(
            config=parse(config_for(tmp_path, live.url)),
            arm=arm,
            instance=instance,
            store=store,
            metrics=Metrics(CollectorRegistry()),
            clock=SystemClock(stop),
            stop=stop,
            log=structlog.get_logger(),
            dry_run=True,
        )
        assert service._update_domain == 0
    finally:
        store.close()
        arm.close()
        imds.close()


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("7", 7.0),
        ("2.5", 2.5),
        ("99999999999999", 3600.0),  # a wait this long overflowed the watcher's wait
        ("1" * 400, 3600.0),
        ("\u00b2", 60.0),  # a digit to str.isdigit, not to float()
        ("nan", 60.0),
        ("-5", 60.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),
        ("", 60.0),
    ],
)
def test_a_throttled_answer_waits_a_bounded_time_whatever_its_retry_after_says(
    live: Emulator, arm_client: tuple[ArmClient, str], header: str, seconds: float
) -> None:
    client, resource_id = arm_client
    live.control("POST", "arm", {"error": {"status": 429, "retry_after": header}})
    with pytest.raises(ArmError) as raised:
        client.instance_view(resource_id)
    assert raised.value.cause == "throttled"
    assert raised.value.retry_after == seconds


def test_the_system_clock_waits_out_any_length_without_overflowing() -> None:
    stop = threading.Event()
    outcome: list[object] = []

    def wait() -> None:
        try:
            outcome.append(SystemClock(stop).wait(1e300))
        except OverflowError as error:
            outcome.append(error)

    waiter = threading.Thread(target=wait)
    waiter.start()
    stop.set()
    waiter.join(timeout=10)
    assert outcome == [True]


def test_an_operation_elsewhere_than_arm_is_never_followed_with_the_token(
    arm_client: tuple[ArmClient, str],
) -> None:
    client, _ = arm_client
    elsewhere = StandIn()
    try:
        with pytest.raises(ArmError) as raised:
            client.operation_status(f"{elsewhere.url}/operations/1")
        assert raised.value.cause == "bad_answer" and "not followed" in str(raised.value)
        assert elsewhere.gets == 0
    finally:
        elsewhere.close()


def test_an_operation_that_never_ends_is_given_up_on(
    live: Emulator, tmp_path: Path, agents: list[Agent], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(selfservice, "OPERATION_BUDGET_SECONDS", 2.0, raising=False)
    live.control("POST", "arm", {"status": windows(), "operation_polls": 1_000_000})
    agents.append(agent := Agent(tmp_path, live.url))
    wait_until(lambda: performed(live) == 1, timeout=30)
    wait_until(
        lambda: (r := self_service_record(agent)) is not None and r.state == "done", timeout=30
    )
    assert "did not end within 2 s" in self_service_record(agent).decision
