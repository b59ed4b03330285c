"""Generated faults: hostile values in every field of every answer the agent reads (the Scheduled
Events document, instance metadata, the managed-identity token, ARM's answers, FleetLock's),
slow, trickled, truncated and oversized answers, random damage to the state file, and each
thread raising. The agent never exits, never hangs past its budget, and never approves an event
of this VM whose prepare did not succeed. The counts are printed at the end of the run."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pytest

from agent.arm import ArmClient
from agent.clock import SystemClock
from agent.errors import AgentError, DocumentError
from agent.events import parse_document_bytes
from agent.fleet import FleetLockSlots, Holding
from agent.imds import ImdsClient, RetryPolicy
from agent.state import Store
from tests.agent_harness import calls
from tests.conftest import Emulator, approved_ids, wait_until
from tests.reliability.agents import AgentProcess
from tests.standin import SlowServer, StandIn
from tests.test_never_down import (
    THREADS,
    damage,
    free_port,
    more_polls,
    polls,
    populated_store,
)

# Raw JSON text put where a value belongs: out-of-range and non-integer numbers, deep nesting,
# strings with NUL, invalid UTF-8, every JSON type, a huge string.
HOSTILE_VALUES: dict[str, bytes] = {
    "int_2^63": b"9223372036854775808",
    "int_-2^63-1": b"-9223372036854775809",
    "int_huge": b"1" + b"0" * 400,
    "float_overflow": b"1e400",
    "float_for_int": b"1.5",
    "negative_zero": b"-0.0",
    "nan": b"NaN",
    "infinity": b"-Infinity",
    "deep_array": b"[" * 100_000 + b"]" * 100_000,
    "deep_object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "nul_escaped": b'"a\\u0000b"',
    "nul_raw": b'"a\x00b"',
    "invalid_utf8": b'"\xff\xfe\xc3("',
    "lone_surrogate": b'"\\ud800"',
    "not_latin1": b'"\\u2603"',
    "header_break": b'"a\\r\\nX-Injected: 1"',
    "empty_string": b'""',
    "null": b"null",
    "true": b"true",
    "empty_list": b"[]",
    "empty_object": b"{}",
    "huge_string": b'"' + b"x" * 200_000 + b'"',
}

# Each answer as (key, raw value) pairs, so that a value can be replaced or a key repeated.
EVENT_ID = "C7061BAC-AFDC-4513-B24B-AA5F13A16123"
EVENT: list[tuple[str, bytes]] = [
    ("EventId", json.dumps(EVENT_ID).encode()),
    ("EventStatus", b'"Scheduled"'),
    ("EventType", b'"Reboot"'),
    ("ResourceType", b'"VirtualMachine"'),
    ("Resources", b'["web_4"]'),
    ("NotBefore", b'"Mon, 19 Sep 2016 18:29:47 GMT"'),
    ("Description", b'"Host server is undergoing maintenance."'),
    ("EventSource", b'"Platform"'),
    ("DurationInSeconds", b"60"),
]
COMPUTE: list[tuple[str, bytes]] = [
    ("name", b'"web_4"'),
    ("vmId", b'"6a2d5d5c-7a71-4a2b-9d5e-111111111111"'),
    ("subscriptionId", b'"00000000-0000-0000-0000-000000000000"'),
    ("resourceGroupName", b'"rg"'),
    ("vmScaleSetName", b'""'),
    ("platformUpdateDomain", b'"0"'),
    ("platformFaultDomain", b'"0"'),
    ("location", b'"westeurope"'),
    ("zone", b'""'),
    ("resourceId", b'"/subscriptions/s/resourceGroups/rg/providers/x/virtualMachines/web_4"'),
]
TOKEN: list[tuple[str, bytes]] = [
    ("access_token", b'"eyJ0"'),
    ("expires_on", b'"1900000000"'),
    ("resource", b'"https://management.azure.com/"'),
    ("token_type", b'"Bearer"'),
]
WINDOWS: list[tuple[str, bytes]] = [
    ("isCustomerInitiatedMaintenanceAllowed", b"true"),
    ("preMaintenanceWindowStartTime", b'"2026-01-01T00:00:00.0000000Z"'),
    ("preMaintenanceWindowEndTime", b'"2026-02-01T00:00:00Z"'),
    ("maintenanceWindowStartTime", b'"2026-02-02T00:00Z"'),
    ("maintenanceWindowEndTime", b'"2026-02-03T00:00:00.25Z"'),
    ("lastOperationResultCode", b'"None"'),
]
OPERATION: list[tuple[str, bytes]] = [("status", b'"InProgress"')]
FLEETLOCK_REFUSAL: list[tuple[str, bytes]] = [("kind", b'"failed_lock"'), ("value", b'"held"')]


def obj(pairs: list[tuple[str, bytes]]) -> bytes:
    return b"{" + b",".join(json.dumps(key).encode() + b":" + value for key, value in pairs) + b"}"


def variants(pairs: list[tuple[str, bytes]]) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """Every field replaced by every hostile value, and every field given twice (the second
    time hostile)."""
    for index, (key, _) in enumerate(pairs):
        for name, value in HOSTILE_VALUES.items():
            replaced = list(pairs)
            replaced[index] = (key, value)
            yield f"{key}={name}", replaced
            yield f"{key}+duplicate={name}", [*pairs, (key, value)]


def documents() -> Iterator[tuple[str, bytes]]:
    for case, event in variants(EVENT):
        yield case, obj([("DocumentIncarnation", b"7"), ("Events", b"[" + obj(event) + b"]")])
    for case, top in variants(
        [("DocumentIncarnation", b"7"), ("Events", b"[" + obj(EVENT) + b"]")]
    ):
        yield case, obj(top)


def instances() -> Iterator[tuple[str, bytes]]:
    for case, compute in variants(COMPUTE):
        yield case, obj([("compute", obj(compute))])
    for case, top in variants([("compute", obj(COMPUTE))]):
        yield case, obj(top)


def wrapped(
    pairs: list[tuple[str, bytes]], wrap: Callable[[bytes], bytes]
) -> Iterator[tuple[str, bytes]]:
    for case, changed in variants(pairs):
        yield case, wrap(obj(changed))


ANSWERS: dict[str, Callable[[], Iterator[tuple[str, bytes]]]] = {
    "instance metadata": instances,
    "token": lambda: wrapped(TOKEN, lambda body: body),
    "ARM instance view": lambda: wrapped(
        WINDOWS, lambda body: obj([("maintenanceRedeployStatus", body)])
    ),
    "ARM operation": lambda: wrapped(OPERATION, lambda body: body),
    "FleetLock refusal": lambda: wrapped(FLEETLOCK_REFUSAL, lambda body: body),
}


def test_every_hostile_value_in_every_field_of_the_document(tried: Counter[str]) -> None:
    """A document is refused, or each of its events can be stored and read back."""
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for case, body in documents():
        store = Store(":memory:")
        try:
            document = parse_document_bytes(body)
            for event in document.events:
                store.discover(event, relevant=True, reason="test", document_incarnation=1, now=now)
                assert store.get(event.key) is not None
        except DocumentError:
            pass
        except Exception as error:  # anything else would reach the poll loop as a bug
            pytest.fail(f"{case}: {type(error).__name__}: {error}")
        finally:
            store.close()
        tried["hostile values: Scheduled Events document"] += 1


@pytest.mark.parametrize("answer", sorted(ANSWERS))
def test_every_hostile_value_in_every_field_of_the_other_answers(
    answer: str, tried: Counter[str]
) -> None:
    stand_in = StandIn()
    stop = threading.Event()
    clock = SystemClock(stop)
    imds = ImdsClient(stand_in.url, clock=clock, stop=stop, retry=RetryPolicy(budget_seconds=0.1))
    token_source = StandIn()
    token_source.serve({"access_token": "t", "expires_on": "1900000000"})
    arm_imds = ImdsClient(token_source.url, clock=clock, stop=stop)
    arm = ArmClient(stand_in.url, arm_imds, clock=clock, stop=stop, timeout_seconds=5)
    fleetlock = FleetLockSlots(stand_in.url, "web", holder="web_4", stop=stop)
    stand_in.post_status = 409  # FleetLock's refusals come with a POST's answer
    stand_in.post_answers_body = True
    calls_for = {
        "instance metadata": imds.fetch_instance_metadata,
        # The token as the ARM client uses it, in its Authorization header.
        "token": lambda: ArmClient(
            stand_in.url, imds, clock=clock, stop=stop, timeout_seconds=5
        ).instance_view("/subscriptions/s/vm"),
        "ARM instance view": lambda: arm.instance_view("/subscriptions/s/vm"),
        "ARM operation": lambda: arm.operation_status(f"{stand_in.url}/operations/1"),
        "FleetLock refusal": lambda: fleetlock.acquire(Holding(("e",), "now")),
    }
    try:
        for case, body in ANSWERS[answer]():
            stand_in.serve_bytes(body)
            try:
                calls_for[answer]()
            except AgentError:
                pass
            except Exception as error:
                pytest.fail(f"{answer} {case}: {type(error).__name__}: {error}")
            tried[f"hostile values: {answer}"] += 1
    finally:
        stand_in.close()
        token_source.close()
        imds.close()
        arm.close()
        fleetlock.close()


# The agent, as a process, fed hostile documents about an event whose prepare fails ---------


def test_hostile_documents_never_get_an_unprepared_event_approved(
    tmp_path: Path, tried: Counter[str]
) -> None:
    stand_in = StandIn()
    good = obj([("DocumentIncarnation", b"7"), ("Events", b"[" + obj(EVENT) + b"]")])
    stand_in.serve_bytes(good)
    (tmp_path / "fail-prepare-Reboot").touch()
    agent = AgentProcess(tmp_path, stand_in.url)
    try:
        wait_until(lambda: f"start prepare Reboot {EVENT_ID}" in calls(tmp_path), timeout=30)
        cases = list(documents())
        for case, body in random.Random(13).sample(cases, 60):
            served = stand_in.gets
            stand_in.serve_bytes(body)
            wait_until(
                lambda served=served: stand_in.gets >= served + 2, timeout=30
            )  # polled, and again
            assert agent.alive(), f"the agent exited on {case}"
            tried["hostile documents served to the agent"] += 1
        stand_in.serve_bytes(good)
        served = stand_in.gets
        wait_until(lambda: stand_in.gets >= served + 3, timeout=30)
        assert EVENT_ID not in stand_in.approved_ids()
        assert agent.alive()
    finally:
        agent.stop()
        stand_in.close()


# Slow, trickled, truncated and oversized answers -----------------------------------------

ANSWER_MODES = ("trickle", "trickle_headers", "silent", "truncated", "oversized")


def test_slow_truncated_and_oversized_answers_fail_polls_within_their_budget(
    tmp_path: Path, tried: Counter[str]
) -> None:
    imds = SlowServer()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    agent = AgentProcess(tmp_path, imds.url, metrics={"listen": f"127.0.0.1:{port}"})
    try:
        more_polls(url, "unchanged", timeout=30)
        for mode in ANSWER_MODES:
            failed = polls(url, "failed")
            imds.mode = mode
            # A poll's budget is 5 s, its last attempt's deadline 7 s: a failed poll is counted
            # within 12 s on any machine that runs the agent at all; 40 s is the test's patience.
            more_polls(url, "failed", than=failed)
            tried[f"{mode} answers: the poll failed within its budget, then recovered"] += 1
            imds.mode = "good"
            more_polls(url, "unchanged", than=polls(url, "unchanged"))
            assert agent.alive()
        assert agent.stop() == 0
    finally:
        if agent.alive():
            agent.kill()
        imds.close()


# Random damage to the state file ----------------------------------------------------------

DAMAGE_RUNS = 20
WAL_DAMAGE_RUNS = 6


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("template") / "state.db"
    populated_store(path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def wal_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """A store as a process that was killed leaves it: the last writes still in its -wal."""
    path = tmp_path_factory.mktemp("wal-template") / "state.db"
    populated_store(path)
    writer = sqlite3.connect(path)
    try:
        writer.execute("PRAGMA wal_autocheckpoint=0")
        with writer:
            writer.execute("UPDATE events SET reason = reason || ' (again)'")
            writer.execute("UPDATE hook_runs SET output_tail = output_tail || 'again'")
        return path.read_bytes(), Path(f"{path}-wal").read_bytes()
    finally:
        writer.close()


def damage_at_random(path: Path, chance: random.Random) -> None:
    size = path.stat().st_size
    for _ in range(chance.randint(1, 4)):
        # Anywhere, the header included.
        offset = 0 if chance.random() < 0.2 else chance.randrange(size)
        damage(path, offset, chance.randint(1, 600), seed=chance.randrange(2**32))


@pytest.mark.parametrize("run", range(DAMAGE_RUNS))
def test_random_damage_to_the_state_file_is_survived(
    live: Emulator, tmp_path: Path, template: bytes, run: int, tried: Counter[str]
) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(template)
    damage_at_random(path, random.Random(run))
    moved = prepared_despite_damage(live, tmp_path)
    tried[
        "state file damaged at random: event prepared"
        + (", file moved aside" if moved else ", damage unseen")
    ] += 1


def prepared_despite_damage(live: Emulator, tmp_path: Path) -> bool:
    """Start the agent on the damaged store in ``tmp_path``; once this VM's event is prepared
    and approved, whether the file was moved aside."""
    agent = AgentProcess(tmp_path, live.url)
    try:
        event = live.add_event(type="Reboot")
        wait_until(lambda: approved_ids(live) == [event["EventId"]], timeout=60)
        assert f"end prepare Reboot {event['EventId']}" in calls(tmp_path)
        assert agent.alive()
        return any(line["event"] == "state.moved_aside" for line in agent.logs())
    finally:
        agent.stop()


@pytest.mark.parametrize("run", range(WAL_DAMAGE_RUNS))
def test_random_damage_to_the_write_ahead_log_is_survived(
    live: Emulator, tmp_path: Path, wal_template: tuple[bytes, bytes], run: int, tried: Counter[str]
) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(wal_template[0])
    wal = Path(f"{path}-wal")
    wal.write_bytes(wal_template[1])
    damage_at_random(wal, random.Random(1000 + run))
    moved = prepared_despite_damage(live, tmp_path)
    tried[
        "write-ahead log damaged at random: event prepared"
        + (", file moved aside" if moved else ", damaged frames dropped")
    ] += 1


# Each thread raising ---------------------------------------------------------------------


@pytest.mark.parametrize("thread", THREADS)
def test_each_thread_raising_on_its_own(
    live: Emulator, tmp_path: Path, thread: str, tried: Counter[str]
) -> None:
    from tests.fleet_harness import FleetLockServer

    fleetlock = FleetLockServer(slots=1).start()
    agent = AgentProcess(
        tmp_path,
        live.url,
        failpoints=f"raise:{thread}",
        maintenance={"check_interval_seconds": 0.5},
        fleet={"url": fleetlock.url, "backend": "fleetlock", "group": "web", "retry_seconds": 0.2},
    )
    try:
        event = live.add_event(type="Reboot")
        wait_until(lambda: approved_ids(live) == [event["EventId"]], timeout=60)
        wait_until(
            lambda: any(
                line.get("thread") == thread and "exception" in line for line in agent.logs()
            )
        )
        assert agent.alive()
        tried[f"thread {thread} raised: logged, carried on"] += 1
    finally:
        agent.stop()
        fleetlock.stop()
