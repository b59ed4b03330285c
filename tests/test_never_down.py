"""Never down: no answer, file or value crashes, hangs or stalls the agent (a real process).

Each thread of the agent (the poll loop, the event workers, the maintenance watcher, the fleet
gate) is made to raise once through its ``raise:`` failpoint; slow and silent stand-ins for
IMDS, ARM and the coordinator hold requests past their deadlines; a damaged state file is
started on."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest
import requests

from agent.arm import ArmClient, ArmError
from agent.clock import SystemClock
from agent.errors import AgentError, ImdsError
from agent.events import parse_document
from agent.fleet import BlobSlots, FleetError, FleetLockSlots, Holding
from agent.hooks import HookResult
from agent.imds import ImdsClient, RetryPolicy, Timeouts
from agent.state import Store
from tests.agent_harness import calls
from tests.conftest import Emulator, approved_ids, wait_until
from tests.fleet_harness import ACCOUNT_KEY, FleetLockServer
from tests.reliability.agents import AgentProcess
from tests.standin import SlowServer

THREADS = ("poll", "event", "maintenance", "fleet")
POLLS = "scheduled_events_agent_polls_total"
# systemd's TimeoutStopSec in the unit is 45 s; the agent must be well inside it.
STOP_TIMEOUT_SECONDS = 20


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def metric(url: str, name: str, labels: str) -> float | None:
    """The sample's value; None while the agent is not serving metrics yet."""
    try:
        text = requests.get(f"{url}/metrics", timeout=5).text
    except requests.ConnectionError:
        return None
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return None


def more_polls(url: str, outcome: str, than: float = 0, timeout: float = 40) -> None:
    """Wait until the agent at ``url`` has counted more than ``than`` polls of ``outcome``."""
    labels = f'outcome="{outcome}"'
    wait_until(lambda: (metric(url, POLLS, labels) or 0) > than, timeout=timeout)


def polls(url: str, outcome: str) -> float:
    return metric(url, POLLS, f'outcome="{outcome}"') or 0


@pytest.fixture
def processes() -> Iterator[list[AgentProcess]]:
    running: list[AgentProcess] = []
    yield running
    for process in running:
        if process.alive():
            process.kill()
        process.log.close()


def test_every_thread_that_raises_once_logs_counts_and_carries_on(
    live: Emulator, tmp_path: Path, processes: list[AgentProcess]
) -> None:
    fleetlock = FleetLockServer(slots=1).start()
    port = free_port()
    try:
        processes.append(
            agent := AgentProcess(
                tmp_path,
                live.url,
                failpoints=",".join(f"raise:{thread}" for thread in THREADS),
                metrics={"listen": f"127.0.0.1:{port}"},
                maintenance={"check_interval_seconds": 0.5},
                fleet={
                    "url": fleetlock.url,
                    "backend": "fleetlock",
                    "group": "web",
                    "retry_seconds": 0.2,
                },
            )
        )
        event = live.add_event(type="Reboot")
        # The event's worker raised once and is taken up again: prepared, approved.
        wait_until(lambda: approved_ids(live) == [event["EventId"]], timeout=60)
        assert f"end prepare Reboot {event['EventId']}" in calls(tmp_path)
        url = f"http://127.0.0.1:{port}"
        for thread in THREADS:
            wait_until(
                lambda thread=thread: (
                    metric(
                        url, "scheduled_events_agent_unexpected_errors_total", f'thread="{thread}"'
                    )
                    == 1
                ),
                timeout=30,
            )
        logs = agent.logs()
        failed = [
            line
            for line in logs
            if line.get("event") in ("thread.unexpected_error", "event.work_failed")
        ]
        assert sorted(line["thread"] for line in failed) == sorted(THREADS)
        for line in failed:
            assert "Traceback" in line["exception"] and "InjectedFailure" in line["exception"]
        assert not [line for line in logs if line["event"] == "not-json"]
        # Each carried on: polls go on, the windows are read again, the gate asked for a slot.
        checked = metric(url, "scheduled_events_agent_polls_total", 'outcome="unchanged"') or 0
        wait_until(
            lambda: (
                (metric(url, "scheduled_events_agent_polls_total", 'outcome="unchanged"') or 0)
                > checked
            )
        )
        assert any(line["event"] == "maintenance.windows" for line in agent.logs())
        assert any(request["path"] == "/v1/pre-reboot" for request in fleetlock.requests)
        assert agent.alive()
        assert agent.stop() == 0
    finally:
        fleetlock.stop()


# 1. A slow answer never stalls the agent --------------------------------------------------

SLOW_MODES = ("trickle", "trickle_headers", "silent")


def healthz(url: str) -> int:
    try:
        return requests.get(f"{url}/healthz", timeout=5).status_code
    except requests.ConnectionError:
        return 0


@pytest.mark.parametrize("mode", SLOW_MODES)
def test_a_slow_imds_answer_fails_the_poll_and_sigterm_still_stops_the_agent(
    tmp_path: Path, processes: list[AgentProcess], mode: str
) -> None:
    imds = SlowServer()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        processes.append(
            agent := AgentProcess(tmp_path, imds.url, metrics={"listen": f"127.0.0.1:{port}"})
        )
        more_polls(url, "unchanged", timeout=30)
        imds.mode = mode
        # The poll that meets it fails like any other: logged, counted, unhealthy.
        more_polls(url, "failed")
        assert any(line["event"] == "imds.poll_failed" for line in agent.logs())
        wait_until(lambda: healthz(url) == 503, timeout=40)
        # The loop goes on: more polls fail, each within its deadline.
        more_polls(url, "failed", than=polls(url, "failed"))
        # SIGTERM ends the agent, whatever request it is in, well within systemd's stop timeout.
        requested = imds.requests
        wait_until(lambda: imds.requests > requested, timeout=40)
        agent.process.send_signal(signal.SIGTERM)
        assert agent.process.wait(timeout=STOP_TIMEOUT_SECONDS) == 0
        agent.log.close()
    finally:
        imds.close()


def test_the_agent_recovers_when_imds_answers_again(
    tmp_path: Path, processes: list[AgentProcess]
) -> None:
    imds = SlowServer()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        processes.append(AgentProcess(tmp_path, imds.url, metrics={"listen": f"127.0.0.1:{port}"}))
        wait_until(lambda: healthz(url) == 200, timeout=30)
        imds.mode = "trickle"
        more_polls(url, "failed")
        imds.mode = "good"
        more_polls(url, "unchanged", than=polls(url, "unchanged") + 3)
        assert healthz(url) == 200
    finally:
        imds.close()


def arm_call(url: str, stop: threading.Event, timeout: float) -> Callable[[], object]:
    # The token comes from a good IMDS stand-in; ARM itself is the slow one.
    token = TokenStandIn()
    imds = ImdsClient(token.url, clock=SystemClock(stop), stop=stop)
    client = ArmClient(url, imds, clock=SystemClock(stop), stop=stop, timeout_seconds=timeout)
    return lambda: client.instance_view("/subscriptions/s/resourceGroups/g/providers/x/vm")


def token_call(url: str, stop: threading.Event, timeout: float) -> Callable[[], object]:
    imds = ImdsClient(
        url,
        clock=SystemClock(stop),
        stop=stop,
        timeouts=Timeouts(connect=timeout / 2, read=timeout / 2, first_read=timeout / 2),
        retry=RetryPolicy(budget_seconds=0.1),
    )
    return lambda: imds.fetch_token("https://storage.azure.com/")


def blob_call(url: str, stop: threading.Event, timeout: float) -> Callable[[], object]:
    slots = BlobSlots(
        f"{url}/devstoreaccount1/fleet",
        "web",
        slots=1,
        lease_seconds=15,
        holder="web_4",
        account_key=ACCOUNT_KEY,
        timeout_seconds=timeout,
        stop=stop,
    )
    return lambda: slots.acquire(Holding(("e",), "now"))


def fleetlock_call(url: str, stop: threading.Event, timeout: float) -> Callable[[], object]:
    slots = FleetLockSlots(url, "web", holder="web_4", timeout_seconds=timeout, stop=stop)
    return lambda: slots.acquire(Holding(("e",), "now"))


CLIENTS = {"arm": arm_call, "token": token_call, "blob": blob_call, "fleetlock": fleetlock_call}


class TokenStandIn:
    """IMDS's token endpoint, answering at once."""

    def __init__(self) -> None:
        body = json.dumps({"access_token": "t", "expires_on": "9999999999"}).encode()
        self.server = SlowServer(body)
        self.url = self.server.url


HTTPS_CLIENTS = ("arm", "blob", "fleetlock")  # IMDS, for the token too, is plain HTTP
# Every client with every slow mode; a TLS handshake that never ends for those that speak TLS.
TLS_CASES = [(client, "trickle_tls") for client in HTTPS_CLIENTS]
SLOW_CASES = [(client, mode) for client in sorted(CLIENTS) for mode in SLOW_MODES] + TLS_CASES


def url_for(server: SlowServer) -> str:
    return server.url.replace("http://", "https://") if server.mode == "trickle_tls" else server.url


@pytest.mark.parametrize(("client", "mode"), SLOW_CASES)
def test_every_outbound_call_ends_at_its_deadline(client: str, mode: str) -> None:
    server = SlowServer()
    server.mode = mode
    stop = threading.Event()
    try:
        # 3 s: longer than the server's pause between two bytes, so no single read times out.
        ends_by_its_deadline(CLIENTS[client](url_for(server), stop, 3.0), server)
    finally:
        server.close()


def ends_by_its_deadline(call: Callable[[], object], server: SlowServer) -> None:
    """``call``, whose deadline is 3 s, fails well before the 15 s a slow machine may take."""
    started = time.monotonic()
    with pytest.raises((ArmError, FleetError, ImdsError)):
        call()
    assert server.requests >= 1
    # Without a deadline, this call would wait for the whole trickle (hours) or forever.
    assert time.monotonic() - started < 15


@pytest.mark.parametrize(
    ("client", "mode"), [(client, "silent") for client in sorted(CLIENTS)] + TLS_CASES
)
def test_the_stop_flag_ends_a_call_in_flight(client: str, mode: str) -> None:
    server = SlowServer()
    server.mode = mode
    stop = threading.Event()
    outcome: list[BaseException] = []
    try:
        call = CLIENTS[client](url_for(server), stop, 3600.0)

        def run() -> None:
            try:
                call()
            except BaseException as error:
                outcome.append(error)

        worker = threading.Thread(target=run)
        worker.start()
        wait_until(lambda: server.requests >= 1, timeout=10)
        stop.set()
        worker.join(timeout=15)
        assert not worker.is_alive(), "the call went on after the stop flag was set"
        assert outcome and isinstance(outcome[0], (ArmError, FleetError, AgentError))
    finally:
        server.close()


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_a_malformed_answer_is_a_failed_call_not_an_unexpected_error(client: str) -> None:
    # A chunk size of -5: http.client raises ValueError, which is no requests error.
    server = SlowServer()
    server.mode = "bad_chunk"
    try:
        with pytest.raises((ArmError, FleetError, ImdsError)):
            CLIENTS[client](server.url, threading.Event(), 5.0)()
        assert server.requests >= 1
    finally:
        server.close()


def test_a_malformed_instance_metadata_answer_at_start_up_is_survived(
    tmp_path: Path, processes: list[AgentProcess]
) -> None:
    imds = SlowServer()
    imds.mode = "bad_chunk"
    try:
        # The maintenance watcher reads instance metadata at start-up.
        processes.append(
            agent := AgentProcess(tmp_path, imds.url, maintenance={"check_interval_seconds": 60})
        )
        wait_until(lambda: imds.requests >= 3, timeout=60)
        assert agent.alive(), agent.log_path.read_text()[-2000:]
        assert not any(line["event"] == "thread.unexpected_error" for line in agent.logs())
        assert agent.stop() == 0
    finally:
        imds.close()


def test_a_flood_of_idle_clients_on_the_metrics_port_never_starves_the_agent(
    live: Emulator, tmp_path: Path, processes: list[AgentProcess]
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    processes.append(
        agent := AgentProcess(tmp_path, live.url, metrics={"listen": f"127.0.0.1:{port}"})
    )
    wait_until(lambda: healthz(url) == 200, timeout=30)
    idle: list[socket.socket] = []
    try:
        for _ in range(400):  # each connects and says nothing
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        event = live.add_event(type="Reboot")
        wait_until(lambda: approved_ids(live) == [event["EventId"]], timeout=60)
        assert f"end prepare Reboot {event['EventId']}" in calls(tmp_path)
        threads = len(os.listdir(f"/proc/{agent.process.pid}/task"))
        assert threads < 100, f"{threads} threads: one per idle client"
    finally:
        for connection in idle:
            connection.close()
    wait_until(lambda: healthz(url) == 200, timeout=30)
    assert agent.stop() == 0


class Redirecting:
    """Answers every request with a 307 to ``target``, and counts them."""

    def __init__(self, target: str) -> None:
        owner = self
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                owner.requests += 1
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(307)
                self.send_header("Location", f"{target}{self.path}")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                self.answer()

            def do_POST(self) -> None:
                self.answer()

            def do_PUT(self) -> None:
                self.answer()

            def do_DELETE(self) -> None:
                self.answer()

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_no_outbound_call_follows_a_redirect(client: str) -> None:
    # A redirect could send the VM's token, or its traffic, anywhere: none is followed.
    elsewhere = SlowServer()
    redirecting = Redirecting(elsewhere.url)
    stop = threading.Event()
    try:
        call = CLIENTS[client](redirecting.url, stop, 5.0)
        with pytest.raises((ArmError, FleetError, ImdsError)):
            call()
        assert redirecting.requests >= 1
        assert elsewhere.requests == 0
    finally:
        redirecting.close()
        elsewhere.close()


# 3. A damaged state file is survived ------------------------------------------------------


def populated_store(path: Path, events: int = 60) -> None:
    """A store with the history of ``events`` finished events: several pages of each table."""
    store = Store(path)
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    try:
        for index in range(events):
            event = parse_document(
                {
                    "DocumentIncarnation": index,
                    "Events": [
                        {
                            "EventId": f"00000000-0000-0000-0000-{index:012d}",
                            "EventType": "Reboot",
                            "ResourceType": "VirtualMachine",
                            "Resources": ["web_4"],
                            "EventStatus": "Scheduled",
                            "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT",
                            "Description": "Host server is undergoing maintenance." * 3,
                            "EventSource": "Platform",
                            "DurationInSeconds": 60,
                        }
                    ],
                }
            ).events[0]
            store.discover(
                event, relevant=True, reason="names this VM", document_incarnation=index, now=now
            )
            run = store.hook_started(event.key, "prepare", "10-drain", now, now)
            store.hook_finished(
                run, HookResult("10-drain", "succeeded", 0, 1, "drained\n" * 20, now, now)
            )
            approval = store.approval_started(event.key, "agent", now)
            store.approval_finished(approval, "succeeded", now)
            store.set_meta(last_document=json.dumps({"incarnation": index}))
    finally:
        store.close()


def damage(path: Path, offset: int, length: int, seed: int) -> None:
    noise = random.Random(seed).randbytes(length)
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(noise)


def prepared_and_approved(
    live: Emulator, tmp_path: Path, processes: list[AgentProcess]
) -> tuple[AgentProcess, str]:
    """Start the agent in ``tmp_path``, give this VM an event, and wait until it is prepared
    and approved; the agent and its metrics URL."""
    port = free_port()
    processes.append(
        agent := AgentProcess(tmp_path, live.url, metrics={"listen": f"127.0.0.1:{port}"})
    )
    event = live.add_event(type="Reboot")
    wait_until(lambda: approved_ids(live) == [event["EventId"]], timeout=60)
    assert f"end prepare Reboot {event['EventId']}" in calls(tmp_path)
    return agent, f"http://127.0.0.1:{port}"


def reports(agent: AgentProcess) -> list[subprocess.CompletedProcess[str]]:
    """``status`` and ``history`` run beside the agent, on its configuration."""
    return [
        subprocess.run(
            [sys.executable, "-m", "agent", command, "--config", str(agent.config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        for command in ("status", "history")
    ]


def test_a_page_overwritten_inside_the_state_file_is_moved_aside_and_the_event_prepared(
    live: Emulator, tmp_path: Path, processes: list[AgentProcess]
) -> None:
    path = tmp_path / "state.db"
    populated_store(path)
    page_size = 4096
    # 392 bytes inside the events table's root page: the header of the file stays intact.
    damage(path, page_size + 8, 392, seed=1)
    agent, url = prepared_and_approved(live, tmp_path, processes)
    moved = [line for line in agent.logs() if line["event"] == "state.moved_aside"]
    assert len(moved) == 1
    aside = Path(moved[0]["moved_to"])
    assert aside.exists() and aside.name.startswith("state.db.corrupt-")
    assert metric(url, "scheduled_events_agent_state_degraded", "") == 1
    # status and history read the fresh file.
    for completed in reports(agent):
        assert completed.returncode == 0, completed.stderr
    assert agent.alive()


def test_an_arm_call_through_a_proxy_ends_at_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = SlowServer()
    proxy.mode = "trickle"
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    stop = threading.Event()
    try:
        # ARM's own address is never reached: the proxy takes the request and trickles.
        ends_by_its_deadline(arm_call("http://127.0.0.1:9", stop, 3.0), proxy)
    finally:
        proxy.close()


@pytest.mark.parametrize(
    ("column", "value"),
    [("raw", "[" * 200_000), ("reason", b"\xff full"), ("reason", b"\xff database is locked")],
    ids=["raw_nested_deep", "invalid_utf8_saying_full", "invalid_utf8_saying_locked"],
)
def test_a_record_that_cannot_be_read_back_is_moved_aside_whatever_it_says(
    tmp_path: Path, column: str, value: object
) -> None:
    path = tmp_path / "state.db"
    populated_store(path, events=3)
    with sqlite3.connect(path) as db:
        db.execute(f"UPDATE events SET {column} = CAST(? AS TEXT)", (value,))  # noqa: S608
    store = Store(path, now=lambda: datetime(2027, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    try:
        assert store.moved_aside is not None
        assert store.moved_aside[0].endswith("state.db.corrupt-20270102T030405Z")
        assert store.degraded is None and store.events() == []
    finally:
        store.close()


def make_symlink_loop(path: Path) -> None:
    os.symlink(path.name, path)  # state.db -> state.db


def companion_fifo(suffix: str) -> Callable[[Path], None]:
    """A good store, and a FIFO where SQLite looks for its journal, WAL or shared memory."""

    def make(path: Path) -> None:
        populated_store(path, events=2)
        os.mkfifo(f"{path}{suffix}")

    return make


@pytest.mark.parametrize(
    "make",
    [
        make_symlink_loop,
        os.mkfifo,
        os.mkdir,
        companion_fifo("-journal"),
        companion_fifo("-wal"),
        companion_fifo("-shm"),
    ],
    ids=["symlink_loop", "fifo", "directory", "journal_fifo", "wal_fifo", "shm_fifo"],
)
def test_a_state_path_that_is_no_file_leaves_the_agent_in_memory_and_stoppable(
    live: Emulator, tmp_path: Path, processes: list[AgentProcess], make: Callable[[Path], None]
) -> None:
    make(tmp_path / "state.db")
    agent, url = prepared_and_approved(live, tmp_path, processes)
    assert metric(url, "scheduled_events_agent_state_degraded", "") == 1
    # status is answered live by the agent, from its memory; history refuses the path with a
    # message, at once, and touches nothing.
    status, history = reports(agent)
    assert status.returncode == 0, status.stderr
    assert "live from the running agent" in status.stdout
    assert history.returncode != 0
    assert "state.db" in history.stderr and "Traceback" not in history.stderr
    started = time.monotonic()
    assert agent.stop() == 0
    assert time.monotonic() - started < STOP_TIMEOUT_SECONDS
    assert os.path.lexists(tmp_path / "state.db")


@pytest.mark.parametrize("kind", ["fifo", "dev_null"])
def test_a_lock_path_that_is_no_file_falls_back_to_locking_the_directory(
    live: Emulator, tmp_path: Path, processes: list[AgentProcess], kind: str
) -> None:
    lock = tmp_path / "state.db.lock"
    if kind == "fifo":
        os.mkfifo(lock)
    else:
        os.symlink("/dev/null", lock)
    agent, url = prepared_and_approved(live, tmp_path, processes)
    assert metric(url, "scheduled_events_agent_state_degraded", "") == 0
    assert any(line["event"] == "agent.lock_fallback" for line in agent.logs())
    assert agent.stop() == 0


def test_status_reads_a_state_file_whose_path_holds_uri_characters(tmp_path: Path) -> None:
    path = tmp_path / "odd?name#50%25" / "state.db"
    populated_store(path, events=2)
    store = Store(path, read_only=True)
    try:
        assert len(store.events()) == 2
    finally:
        store.close()


def test_clients_that_trickle_their_requests_never_keep_a_probe_out(
    live: Emulator, tmp_path: Path, processes: list[AgentProcess]
) -> None:
    """A byte every 2 s resets no per-read timeout's clock for long: each request must arrive
    whole within 5 s, and a full listener makes room by dropping the longest waiting."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    processes.append(AgentProcess(tmp_path, live.url, metrics={"listen": f"127.0.0.1:{port}"}))
    wait_until(lambda: healthz(url) == 200, timeout=30)
    stop = threading.Event()
    connected = []

    def trickle() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
                    connected.append(1)
                    for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                        connection.sendall(bytes([byte]))
                        if stop.wait(2.0):
                            return
            except OSError:
                continue  # cut: come back at once, as an attacker would

    trickling = [threading.Thread(target=trickle, daemon=True) for _ in range(40)]
    for thread in trickling:
        thread.start()
    try:
        wait_until(lambda: len(connected) >= 40)  # more than the listener's 32 slots
        answered = sum(healthz(url) == 200 for _ in range(10))
        assert answered >= 8, f"/healthz answered {answered} of 10 probes"
    finally:
        stop.set()
        for thread in trickling:
            thread.join(timeout=10)
