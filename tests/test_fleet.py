"""Fleet coordination, part by part: the blob backend against Azurite, the gate, the FleetLock
backend against a server that follows the protocol, the configuration and what status shows."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlencode

import pytest
import structlog
from prometheus_client import CollectorRegistry

from agent.clock import SystemClock
from agent.config import FleetConfig, parse
from agent.errors import ConfigError
from agent.fleet import (
    STORAGE_VERSION,
    Attempt,
    BlobSlots,
    FleetError,
    FleetGate,
    FleetLockSlots,
    Holding,
)
from agent.imds import ImdsClient, TokenCache
from agent.metrics import Metrics
from agent.state import Store
from tests.agent_harness import RunningAgent, calls, start_agent
from tests.conftest import Emulator, approved_ids, wait_until
from tests.fleet_harness import ACCOUNT, ACCOUNT_KEY, Azurite, FleetLockServer, fleet_section
from tests.standin import SlowServer


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    server = Azurite(tmp_path_factory.mktemp("azurite")).start()
    yield server
    server.stop()


@pytest.fixture
def container(azurite: Azurite, request: pytest.FixtureRequest) -> str:
    """A new container for each test: groups never meet."""
    name = request.node.name.replace("_", "-")[:50].strip("-").lower()
    return azurite.create_container(name)


def slots(url: str, holder: str, count: int = 2, **options: Any) -> BlobSlots:
    options.setdefault("account_key", ACCOUNT_KEY)
    return BlobSlots(url, "web", slots=count, lease_seconds=15, holder=holder, **options)


# The blob backend --------------------------------------------------------------------------


def test_n_slots_go_to_n_holders_and_a_release_frees_one(container: str) -> None:
    vm_0, vm_1, vm_2 = (slots(container, name) for name in ("vm_0", "vm_1", "vm_2"))
    first = vm_0.acquire(Holding(("E0",), "2026-11-26T12:00:00+00:00"))
    second = vm_1.acquire(Holding(("E1",), "2026-11-26T12:00:01+00:00"))
    assert {first.slot, second.slot} == {"web/slot-0", "web/slot-1"}
    third = vm_2.acquire(Holding(("E2",), "2026-11-26T12:00:02+00:00"))
    assert third.slot is None and "all 2 slot(s) of group web are held" in third.detail
    shown = {view.name: view for view in vm_2.describe()}
    assert first.slot is not None
    assert shown[first.slot].held and shown[first.slot].holder == "vm_0"
    assert shown[first.slot].event_id == "E0"
    assert shown[first.slot].since == "2026-11-26T12:00:00+00:00"

    vm_0.release(first.slot)
    assert vm_2.acquire(Holding(("E2",), "now")).slot == first.slot
    assert vm_1.renew(str(second.slot), Holding((), "now"))
    assert not vm_0.renew(first.slot, Holding((), "now"))  # someone else's now
    for backend in (vm_0, vm_1, vm_2):
        backend.close()


def test_the_same_agent_after_a_restart_can_give_back_what_it_held(container: str) -> None:
    before = slots(container, "vm_0", count=1)
    assert before.acquire(Holding(("E0",), "now")).slot == "web/slot-0"
    before.close()
    after = slots(container, "vm_0", count=1)  # a new process: the lease id is derived again
    after.release(None)
    assert after.describe()[0].held is False
    after.close()


def lapse(backend: BlobSlots, slot: str) -> None:
    """End the lease at once, as its running out would while the holder's VM is down."""
    broken = backend.send(
        "PUT",
        slot,
        {"comp": "lease"},
        {"x-ms-lease-action": "break", "x-ms-lease-break-period": "0", "Content-Length": "0"},
    )
    assert broken.status_code == 202, broken.text


def test_a_slot_marked_down_stays_its_holders_after_the_lease_lapses(container: str) -> None:
    holder, other = slots(container, "vm_0", count=1), slots(container, "vm_1", count=1)
    assert holder.acquire(Holding(("E0",), "now", down_seconds=600)).slot == "web/slot-0"
    lapse(other, "web/slot-0")
    refused = other.acquire(Holding(("E1",), "now"))
    assert refused.slot is None
    assert "vm_0 held it through its maintenance (E0) until" in refused.detail
    (view,) = other.describe()
    assert view.held and view.holder == "vm_0" and view.down_until is not None
    # Back after its reboot, the holder takes its own slot again; then gives it back for good.
    back = slots(container, "vm_0", count=1)
    assert back.acquire(Holding(("E0",), "now", down_seconds=600)).slot == "web/slot-0"
    lapse(other, "web/slot-0")
    back.release(None)
    assert other.acquire(Holding(("E1",), "now")).slot == "web/slot-0"
    for backend in (holder, other, back):
        backend.close()


def test_giving_back_a_lapsed_slot_never_wipes_the_marker_of_its_next_holder(
    container: str,
) -> None:
    # vm_0's lease lapsed (its renewals failed); vm_1 took the slot, approved and went down
    # for its reboot; then vm_0 gives back what it thinks it still holds.
    before, after = slots(container, "vm_0", count=1), slots(container, "vm_1", count=1)
    assert before.acquire(Holding(("E0",), "now")).slot == "web/slot-0"
    lapse(after, "web/slot-0")
    assert after.acquire(Holding(("E1",), "now", down_seconds=600)).slot == "web/slot-0"
    lapse(after, "web/slot-0")
    before.release("web/slot-0")
    third = slots(container, "vm_2", count=1)
    refused = third.acquire(Holding(("E2",), "now"))
    assert refused.slot is None and "vm_1 held it through its maintenance" in refused.detail
    for backend in (before, after, third):
        backend.close()


def test_a_slot_not_marked_down_is_free_once_the_lease_lapses(container: str) -> None:
    holder, other = slots(container, "vm_0", count=1), slots(container, "vm_1", count=1)
    assert holder.acquire(Holding(("E0",), "now", down_seconds=0)).slot == "web/slot-0"
    lapse(other, "web/slot-0")
    taken = other.acquire(Holding(("E1",), "now"))
    assert taken.slot == "web/slot-0" and taken.took_over is None
    holder.close()
    other.close()


def test_a_marker_whose_time_ran_out_is_taken_over_and_said(container: str) -> None:
    holder, other = slots(container, "vm_0", count=1), slots(container, "vm_1", count=1)
    assert holder.acquire(Holding(("E0",), "now", down_seconds=1)).slot == "web/slot-0"
    lapse(other, "web/slot-0")
    taken: list[Attempt] = []

    def took() -> bool:
        attempt = other.acquire(Holding(("E1",), "now"))
        taken.append(attempt)
        return attempt.slot is not None

    # Storage's clock counts, to the second: within a few seconds the marker has run out.
    wait_until(took, timeout=10, interval=0.5)
    assert taken[-1].took_over is not None and "vm_0" in taken[-1].took_over
    holder.close()
    other.close()


def test_a_freed_slot_goes_to_the_waiter_with_the_earliest_not_before(container: str) -> None:
    holder = slots(container, "vm_0", count=1)
    late, soon = slots(container, "vm_late", count=1), slots(container, "vm_soon", count=1)
    assert holder.acquire(Holding(("E0",), "now")).slot == "web/slot-0"
    # vm_late asks first, but its event is due in 14 minutes, vm_soon's in 2.
    assert late.acquire(Holding(("L",), "now"), not_before="2030-01-01T00:14:00Z").slot is None
    assert soon.acquire(Holding(("S",), "now"), not_before="2030-01-01T00:02:00Z").slot is None
    assert [waiter.holder for waiter in holder.queue()] == ["vm_soon", "vm_late"]
    holder.release("web/slot-0")
    refused = late.acquire(Holding(("L",), "now"), not_before="2030-01-01T00:14:00Z")
    assert refused.slot is None and "vm_soon" in refused.detail
    assert soon.acquire(Holding(("S",), "now"), not_before="2030-01-01T00:02:00Z").slot
    soon.leave_queue()
    assert [waiter.holder for waiter in holder.queue()] == ["vm_late"]
    for backend in (holder, late, soon):
        backend.close()


def test_a_waiter_that_vanished_stops_counting_once_its_heartbeat_is_stale(
    container: str,
) -> None:
    gone, waiting = slots(container, "vm_gone", count=1), slots(container, "vm_wait", count=1)
    holder = slots(container, "vm_0", count=1)
    assert holder.acquire(Holding(("E0",), "now")).slot == "web/slot-0"
    assert gone.acquire(Holding(("G",), "now"), not_before="2030-01-01T00:01:00Z").slot is None
    gone.close()  # and never heard of again
    holder.release("web/slot-0")
    assert waiting.acquire(Holding(("W",), "now"), not_before="2030-01-01T00:09:00Z").slot is None

    def taken() -> bool:
        attempt = waiting.acquire(Holding(("W",), "now"), not_before="2030-01-01T00:09:00Z")
        return attempt.slot is not None

    # Stale after 15 s without a heartbeat (storage's clock): then vm_wait goes first.
    wait_until(taken, timeout=40, interval=1)
    assert [w.fresh for w in holder.queue() if w.holder == "vm_gone"] == [False]
    for backend in (holder, waiting):
        backend.close()


def test_a_wrong_key_is_refused_with_the_role_to_grant(container: str) -> None:
    wrong = base64.b64encode(b"not the key").decode()
    backend = slots(container, "vm_0", account_key=wrong)
    with pytest.raises(FleetError) as raised:
        backend.acquire(Holding(("E0",), "now"))
    assert raised.value.reason == "auth"
    assert "Storage Blob Data Contributor" in str(raised.value)
    backend.close()


def test_a_missing_container_says_create_it(azurite: Azurite) -> None:
    backend = slots(azurite.container_url("nosuchcontainer"), "vm_0")
    with pytest.raises(FleetError) as raised:
        backend.acquire(Holding(("E0",), "now"))
    assert raised.value.reason == "refused"
    assert "create the container" in str(raised.value)
    backend.close()


def account_sas(permissions: str) -> str:
    """An account SAS for the blob service, signed as Azure documents it (version 2021-08-06)."""
    expiry = (datetime.now(timezone.utc) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    fields = [ACCOUNT, permissions, "b", "sco", "", expiry, "", "http", STORAGE_VERSION, ""]
    text = "\n".join(fields) + "\n"
    key = base64.b64decode(ACCOUNT_KEY)
    signature = base64.b64encode(hmac.new(key, text.encode(), hashlib.sha256).digest()).decode()
    return urlencode(
        {
            "sv": STORAGE_VERSION,
            "ss": "b",
            "srt": "sco",
            "sp": permissions,
            "se": expiry,
            "spr": "http",
            "sig": signature,
        }
    )


def test_a_sas_token_works_and_one_without_write_is_refused(container: str) -> None:
    backend = slots(container, "vm_0", account_key=None, sas_token="?" + account_sas("racwdl"))
    assert backend.acquire(Holding(("E0",), "now")).slot is not None
    assert backend.describe()[0].holder in ("vm_0", None)
    backend.close()
    read_only = slots(container, "vm_1", account_key=None, sas_token=account_sas("rl"))
    with pytest.raises(FleetError) as raised:
        read_only.acquire(Holding(("E1",), "now"))
    assert raised.value.reason == "auth"
    read_only.close()


class RecordingStorage(BaseHTTPRequestHandler):
    """Azurite takes OAuth only over HTTPS: this stand-in records the headers a request carries."""

    seen: ClassVar[list[dict[str, str]]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def answer(self, status: int, body: bytes = b"") -> None:
        RecordingStorage.seen.append(dict(self.headers))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        self.answer(200 if "comp=metadata" in self.path else 201)

    def do_DELETE(self) -> None:
        self.answer(202)

    def do_HEAD(self) -> None:
        self.answer(200)

    def do_GET(self) -> None:  # an empty listing: no slot held, nobody in line
        self.answer(200, b"<EnumerationResults><Blobs/></EnumerationResults>")


def test_without_a_key_or_sas_the_managed_identity_token_is_sent(emulator: Emulator) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingStorage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    imds = ImdsClient(emulator.url, clock=SystemClock())
    cache = TokenCache(imds, "https://storage.azure.com/", clock=SystemClock())
    url = f"http://127.0.0.1:{server.server_address[1]}/{ACCOUNT}/fleet"
    backend = slots(url, "vm_0", account_key=None, token=cache)
    try:
        assert backend.acquire(Holding(("E0",), "now")).slot is not None
        token = cache.get()  # the one fetched from IMDS for the request, kept
    finally:
        backend.close()
        server.shutdown()
        server.server_close()
        imds.close()
    assert all(seen["Authorization"] == f"Bearer {token}" for seen in RecordingStorage.seen)
    lease = next(seen for seen in RecordingStorage.seen if "x-ms-lease-action" in seen)
    assert lease["x-ms-version"] >= "2017-11-09"  # the first version that takes OAuth
    assert lease["x-ms-lease-action"] == "acquire"


# The gate ---------------------------------------------------------------------------------


class Gate:
    def __init__(self, backend: Any, directory: Path, **config: Any) -> None:
        self.stop = threading.Event()
        self.metrics = Metrics(CollectorRegistry())
        self.store = Store(directory / "state.db")
        self.config = FleetConfig(url="http://127.0.0.1:9/x/y", group="web", **config)
        self.gate = FleetGate(
            backend,
            config=self.config,
            store=self.store,
            metrics=self.metrics,
            clock=SystemClock(self.stop),
            stop=self.stop,
            log=structlog.get_logger("test"),
        )

    def close(self) -> None:
        self.gate.close()
        self.store.close()

    def value(self, name: str, **labels: str) -> float:
        found = self.metrics.registry.get_sample_value(name, labels)
        return found or 0.0


@pytest.fixture
def gates() -> Iterator[list[Gate]]:
    made: list[Gate] = []
    yield made
    for gate in made:
        gate.close()


def test_one_slot_serves_all_events_of_a_vm_and_is_freed_after_the_last(
    container: str, tmp_path: Path, gates: list[Gate]
) -> None:
    mine = Gate(slots(container, "vm_0", count=1), tmp_path / "a")
    gates.append(mine)
    other = slots(container, "vm_1", count=1)
    assert mine.gate.hold("e1", "E1") and mine.gate.hold("e2", "E2")
    assert mine.value("scheduled_events_agent_fleet_slot_held") == 1
    assert mine.value("scheduled_events_agent_fleet_slot_wait_seconds_count") == 2
    mine.gate.release("e1")
    assert other.acquire(Holding(("X",), "now")).slot is None  # e2 still holds it
    mine.gate.release("e2")
    assert mine.value("scheduled_events_agent_fleet_slot_held") == 0
    assert other.acquire(Holding(("X",), "now")).slot == "web/slot-0"
    recorded = json.loads(mine.store.meta()["fleet"])
    assert recorded["slot"] is None and recorded["events"] == []
    other.close()


def test_a_lost_lease_is_noticed_at_renewal_and_counted(
    container: str, tmp_path: Path, gates: list[Gate]
) -> None:
    mine = Gate(slots(container, "vm_0", count=1), tmp_path / "a", lease_seconds=15)
    gates.append(mine)
    # A Terminate: no marker holds the slot through it, so another agent can take it at once.
    assert mine.gate.hold("e1", "E1", event_type="Terminate")
    thief = slots(container, "vm_1", count=1)
    lapse(thief, "web/slot-0")  # as an operator clearing a stuck slot would; then take it
    assert thief.acquire(Holding(("X",), "now")).slot == "web/slot-0"
    mine.gate._renewed_at -= 15  # the renewal is due now (the clock is real: no 5 s sleep)
    mine.gate.tick()
    assert not mine.gate.held()
    assert (
        mine.value("scheduled_events_agent_fleet_errors_total", backend="blob", reason="lost") == 1
    )
    thief.close()


def test_an_approval_is_no_longer_granted_once_the_slot_is_not_fresh(
    container: str, tmp_path: Path, gates: list[Gate]
) -> None:
    # Asked before every try of an approval's POST: a slot whose renewals have failed for a
    # lease may be another VM's by now.
    mine = Gate(slots(container, "vm_0", count=1), tmp_path / "a", lease_seconds=15)
    gates.append(mine)
    assert mine.gate.hold("e1", "E1") and mine.gate.granted("e1")
    mine.gate._renewed_at -= 15  # no renewal for a whole lease (the clock is real: no sleep)
    assert not mine.gate.granted("e1")


def test_an_unreachable_store_means_no_slot_logged_once_and_counted(
    tmp_path: Path, gates: list[Gate]
) -> None:
    dead = slots("http://127.0.0.1:9/devstoreaccount1/fleet", "vm_0")
    mine = Gate(dead, tmp_path / "a")
    gates.append(mine)
    with structlog.testing.capture_logs() as logged:
        assert not mine.gate.hold("e1", "E1")
        assert not mine.gate.hold("e1", "E1")  # asked again within retry_seconds: not tried
        mine.gate._next_try = 0  # the retry is due now (the clock is real: no 5 s sleep)
        assert not mine.gate.hold("e1", "E1")
    assert [entry["event"] for entry in logged].count("fleet.unavailable") == 1
    assert (
        mine.value(
            "scheduled_events_agent_fleet_errors_total", backend="blob", reason="unreachable"
        )
        == 2
    )
    mine.gate.stop_waiting("e1", missed=True)
    assert mine.value("scheduled_events_agent_fleet_slot_missed_total") == 1


def test_a_worker_never_waits_on_the_coordinator(tmp_path: Path, gates: list[Gate]) -> None:
    server = SlowServer()
    server.mode = "silent"  # takes the request and never answers
    stop = threading.Event()
    backend = FleetLockSlots(server.url, "web", holder="vm_0", timeout_seconds=3600, stop=stop)
    mine = Gate(backend, tmp_path / "a")
    gates.append(mine)
    mine.gate.use_own_thread()
    try:
        assert mine.gate.hold("e1", "E1") is False  # says what it wants, and returns
        ticking = threading.Thread(target=mine.gate.tick, daemon=True)
        ticking.start()
        wait_until(lambda: server.requests >= 1)
        # The gate's thread is inside the coordinator's call; a worker still gets its answers.
        answers: list[tuple[bool, bool, object]] = []
        asking = threading.Thread(
            target=lambda: answers.append(
                (mine.gate.hold("e2", "E2"), mine.gate.waiting("e1"), mine.gate.describe()["slot"])
            )
        )
        asking.start()
        asking.join(timeout=10)
        assert answers == [(False, True, None)]
        assert ticking.is_alive(), "the coordinator answered: the test proves nothing"
    finally:
        stop.set()
        server.close()


# The agent with FleetLock -------------------------------------------------------------------


@pytest.fixture
def fleetlock() -> Iterator[FleetLockServer]:
    server = FleetLockServer(slots=1).start()
    yield server
    server.stop()


@pytest.fixture
def running() -> Iterator[list[RunningAgent]]:
    started: list[RunningAgent] = []
    yield started
    for agent in started:
        agent.close()


def fleetlock_agent(
    directory: Path, emulator: Emulator, server: FleetLockServer, name: str
) -> RunningAgent:
    return start_agent(
        directory,
        emulator.url,
        vm_name=name,
        maintenance={"check_interval_seconds": 0},
        fleet={"backend": "fleetlock", "url": server.url, "group": "web", "retry_seconds": 0.2},
    )


def test_fleetlock_agents_take_turns_and_give_the_slot_back(
    live: Emulator, fleetlock: FleetLockServer, running: list[RunningAgent], tmp_path: Path
) -> None:
    events = {}
    for name in ("vm_0", "vm_1"):
        running.append(fleetlock_agent(tmp_path / name, live, fleetlock, name))
        events[name] = live.add_event(
            type="Freeze", resources=[name], not_before_in_seconds=600, started_for_seconds=1
        )["EventId"]

    def over(name: str) -> bool:
        return f"end recover Freeze {events[name]}" in calls(tmp_path / name)

    first = None
    while first is None:  # exactly one holds the slot until its event is over
        wait_until(lambda: len(approved_ids(live)) >= 1, timeout=30)
        first = next(name for name in events if events[name] in approved_ids(live))
    assert fleetlock.held("web") in ([first], [])
    wait_until(lambda: over("vm_0") and over("vm_1"), timeout=60)
    assert sorted(approved_ids(live)) == sorted(events.values())
    wait_until(lambda: fleetlock.held("web") == [], timeout=10)
    # Every request carried the protocol's header and body: the server refuses any other.
    assert {request["id"] for request in fleetlock.requests} == {"vm_0", "vm_1"}
    assert {request["group"] for request in fleetlock.requests} == {"web"}
    paths = [request["path"] for request in fleetlock.requests]
    assert paths.count("/v1/steady-state") >= 2


def test_a_failing_fleetlock_server_means_no_early_approval_until_it_recovers(
    live: Emulator, fleetlock: FleetLockServer, running: list[RunningAgent], tmp_path: Path
) -> None:
    fleetlock.refuse_all = True
    agent = fleetlock_agent(tmp_path, live, fleetlock, "vm_0")
    running.append(agent)
    event_id = live.add_event(type="Freeze", resources=["vm_0"], not_before_in_seconds=600)[
        "EventId"
    ]
    assert agent.metrics is not None
    metrics = agent.metrics

    def refusals() -> float:
        value = metrics.registry.get_sample_value(
            "scheduled_events_agent_fleet_errors_total",
            {"backend": "fleetlock", "reason": "server"},
        )
        return value or 0.0

    wait_until(lambda: refusals() >= 3, timeout=30)
    assert f"end prepare Freeze {event_id}" in calls(tmp_path)  # hooks never wait for a slot
    assert approved_ids(live) == []
    fleetlock.refuse_all = False
    wait_until(lambda: approved_ids(live) == [event_id], timeout=30)
    assert fleetlock.held("web") == ["vm_0"]


def test_an_event_that_waits_for_a_slot_until_not_before_is_never_approved_and_counted(
    live: Emulator, fleetlock: FleetLockServer, running: list[RunningAgent], tmp_path: Path
) -> None:
    fleetlock.holders["web"] = ["vm_9"]  # the group's one slot is taken for the whole notice
    agent = fleetlock_agent(tmp_path, live, fleetlock, "vm_0")
    running.append(agent)
    event_id = live.add_event(
        type="Freeze", resources=["vm_0"], not_before_in_seconds=3, started_for_seconds=1
    )["EventId"]
    wait_until(lambda: f"end recover Freeze {event_id}" in calls(tmp_path), timeout=30)
    assert approved_ids(live) == []
    assert agent.metrics is not None
    registry = agent.metrics.registry
    assert registry.get_sample_value("scheduled_events_agent_fleet_slot_missed_total") == 1
    skipped = {"outcome": "skipped", "reason": "no_fleet_slot"}
    assert registry.get_sample_value("scheduled_events_agent_approvals_total", skipped) == 1
    waited = registry.get_sample_value("scheduled_events_agent_fleet_slot_wait_seconds_sum")
    assert waited is not None and waited >= 2
    record = agent.store.get(event_id)
    assert record is not None and "no fleet slot before the event began" in str(record.decision)
    assert fleetlock.held("web") == ["vm_9"]


def test_at_start_a_fleetlock_slot_left_from_before_is_given_back(
    live: Emulator, fleetlock: FleetLockServer, running: list[RunningAgent], tmp_path: Path
) -> None:
    fleetlock.holders["web"] = ["vm_0"]  # held when the agent died; nothing is pending now
    running.append(fleetlock_agent(tmp_path, live, fleetlock, "vm_0"))
    wait_until(lambda: fleetlock.held("web") == [], timeout=10)


def test_the_fleetlock_backend_reads_the_protocols_errors() -> None:
    server = FleetLockServer(slots=0).start()
    backend = FleetLockSlots(server.url, "web", holder="vm_0")
    try:
        refused = backend.acquire(Holding(("E0",), "now"))
        assert refused.slot is None and "failed_lock" in refused.detail
        backend.release(None)  # unlocking what is not held is fine: the protocol is recursive
    finally:
        backend.close()
        server.stop()


# Configuration and status -------------------------------------------------------------------


def test_the_fleet_section_is_checked_key_by_key() -> None:
    with pytest.raises(ConfigError) as raised:
        parse(
            {
                "fleet": {
                    "url": "ftp://x",
                    "backend": "zookeeper",
                    "group": "a/b",
                    "slots": 0,
                    "lease_seconds": 90,
                    "account_key": "not base64!",
                }
            }
        )
    text = str(raised.value)
    for key in ("url", "backend", "group", "slots", "lease_seconds", "account_key"):
        assert f"fleet.{key}:" in text


def test_fleet_keys_that_do_not_go_together_are_refused() -> None:
    with pytest.raises(ConfigError) as raised:
        parse({"fleet": {"url": "https://host/x", "sas_token": "sv=1", "account_key": "AAAA"}})
    assert "sas_token or account_key, not both" in str(raised.value)
    assert "cannot tell the storage account" in str(raised.value)
    config = parse({"fleet": {"url": "https://acct.blob.core.windows.net/slots", "slots": 3}})
    assert config.fleet.slots == 3 and config.fleet.backend == "blob"


def test_status_shows_the_group_its_slots_and_their_holders(container: str, tmp_path: Path) -> None:
    holder, other = slots(container, "vm_7", count=2), slots(container, "vm_8", count=2)
    taken = holder.acquire(
        Holding(("EVENT-7",), "2026-11-26T12:00:00+00:00", down_seconds=600)
    ).slot
    assert other.acquire(Holding(("EVENT-8",), "now")).slot is not None
    waiting = slots(container, "vm_9", count=2)
    assert (
        waiting.acquire(Holding(("EVENT-9",), "now"), not_before="2030-01-01T00:05:00Z").slot
        is None
    )
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "vm_name": "vm_0",
                "state": {"path": str(tmp_path / "state.db")},
                "fleet": fleet_section(container, slots=2),
            }
        )
    )
    Store(tmp_path / "state.db").close()
    shown = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "fleet: group web (blob, 2 slot(s))" in shown
    held_through = (
        f"{taken}: held by vm_7 for EVENT-7 since 2026-11-26T12:00:00+00:00, down for its "
        "maintenance until "
    )
    assert held_through in shown
    assert "in line for a slot (earliest NotBefore first):" in shown
    assert "1. vm_9: NotBefore 2030-01-01T00:05:00Z, waiting since " in shown
    other.release(None)
    free = ({"web/slot-0", "web/slot-1"} - {taken}).pop()
    shown = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"{free}: free" in shown
    for backend in (holder, other, waiting):
        backend.close()
