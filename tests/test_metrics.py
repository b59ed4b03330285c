"""Metrics, /healthz and sd_notify, against the real emulator and real sockets."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import structlog
import yaml
from prometheus_client import CollectorRegistry

from agent.clock import SystemClock
from agent.daemon import Daemon, assemble
from agent.exposition import MetricsServer
from agent.imds import ImdsClient, RetryPolicy
from agent.metrics import Metrics
from agent.state import Store
from agent.systemd import Notifier
from tests.agent_harness import config_for
from tests.conftest import Emulator, wait_until


class MovableMonotonic(SystemClock):
    """The real clock, but the test can move monotonic time forward (for staleness)."""

    def __init__(self, stop: threading.Event) -> None:
        super().__init__(stop)
        self.offset = 0.0

    def monotonic(self) -> float:
        return super().monotonic() + self.offset


class Running:
    def __init__(
        self,
        directory: Path,
        url: str,
        notify_environment: dict[str, str] | None = None,
        **sections: Any,
    ) -> None:
        from agent.config import parse

        self.config = parse(config_for(directory, url, **sections))
        self.registry = CollectorRegistry()
        self.stop = threading.Event()
        self.clock = MovableMonotonic(self.stop)
        self.imds = ImdsClient(
            url,
            clock=self.clock,
            stop=self.stop,
            retry=RetryPolicy(2, 0.02, 0.1),
            logger=structlog.get_logger(),
        )
        self.store = Store(self.config.state.path)
        parts = assemble(
            self.config,
            imds=self.imds,
            store=self.store,
            clock=self.clock,
            stop=self.stop,
            log=structlog.get_logger(),
            vm_name="web_4",
            metrics=Metrics(self.registry),
            notifier=Notifier(notify_environment or {}),
        )
        self.daemon = Daemon(parts)
        self.thread: threading.Thread | None = None

    def start(self) -> Running:
        self.thread = threading.Thread(target=self.daemon.run)
        self.thread.start()
        return self

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.store.close()
        self.imds.close()


@pytest.fixture
def running() -> Iterator[list[Running]]:
    agents: list[Running] = []
    yield agents
    for agent in agents:
        agent.close()


PREFIX = "scheduled_events_agent"


def test_a_whole_lifecycle_is_counted(
    live: Emulator, tmp_path: Path, running: list[Running]
) -> None:
    running.append(agent := Running(tmp_path, live.url).start())
    event = live.add_event(type="Reboot", not_before_in_seconds=300)
    wait_until(
        lambda: agent.value(f"{PREFIX}_approvals_total", outcome="succeeded", reason="posted") == 1
    )
    assert agent.value(f"{PREFIX}_events_seen_total", type="Reboot", source="Platform") == 1
    assert agent.value(f"{PREFIX}_hook_runs_total", phase="prepare", outcome="succeeded") == 1
    assert agent.value(f"{PREFIX}_hook_duration_seconds_count", phase="prepare") == 1
    assert agent.value(f"{PREFIX}_approval_lead_seconds_count") == 1
    lead = agent.value(f"{PREFIX}_approval_lead_seconds_sum")
    assert lead is not None and 250 < lead <= 301  # NotBefore is rounded up to the second
    live.control("POST", f"events/{event['EventId']}/complete")
    wait_until(
        lambda: agent.value(f"{PREFIX}_hook_runs_total", phase="recover", outcome="succeeded") == 1
    )
    wait_until(lambda: agent.value(f"{PREFIX}_events", type="Reboot", status="Started") == 0)
    assert agent.value(f"{PREFIX}_polls_total", outcome="changed") >= 2  # type: ignore[operator]
    wait_until(lambda: (agent.value(f"{PREFIX}_polls_total", outcome="unchanged") or 0) >= 1)
    assert agent.value(f"{PREFIX}_document_incarnation") == live.world.incarnation
    assert agent.value(f"{PREFIX}_last_successful_poll_timestamp_seconds") > (  # type: ignore[operator]
        datetime.now().timestamp() - 60
    )
    assert agent.value(f"{PREFIX}_build_info", version=__import__("agent").__version__) == 1


def test_pending_events_and_the_next_not_before_are_shown(
    live: Emulator, tmp_path: Path, running: list[Running]
) -> None:
    running.append(agent := Running(tmp_path, live.url, approval={"mode": "never"}).start())
    soon = live.add_event(type="Preempt", not_before_in_seconds=30)
    live.add_event(type="Reboot", not_before_in_seconds=600)
    live.add_event(type="Reboot", resources=["web_9"])  # another VM's: not ours to count
    live.add_event(type="LiveMigrate")
    # The events arrive one request after another: wait for the document that has them all.
    wait_until(lambda: agent.value(f"{PREFIX}_events", type="other", status="Scheduled") == 1)
    assert agent.value(f"{PREFIX}_events", type="Reboot", status="Scheduled") == 1
    assert agent.value(f"{PREFIX}_events", type="Preempt", status="Scheduled") == 1
    expected = live.world.get(soon["EventId"]).not_before
    assert expected is not None
    assert agent.value(f"{PREFIX}_next_event_timestamp_seconds") == int(expected.timestamp())
    assert agent.value(f"{PREFIX}_next_unapproved_event_timestamp_seconds") == int(
        expected.timestamp()
    )
    assert agent.value(f"{PREFIX}_events_seen_total", type="other", source="Platform") == 1


def test_skips_failures_and_late_events_are_counted(
    live: Emulator, tmp_path: Path, running: list[Running]
) -> None:
    (tmp_path / "fail-prepare-Redeploy").touch()
    running.append(agent := Running(tmp_path, live.url).start())
    live.add_event(type="Reboot", resources=["web_4", "web_5"])
    live.add_event(type="Redeploy")
    live.add_event(type="Freeze", status="Started")
    wait_until(
        lambda: agent.value(f"{PREFIX}_approvals_total", outcome="skipped", reason="shared") == 1
    )
    wait_until(
        lambda: (
            agent.value(f"{PREFIX}_approvals_total", outcome="skipped", reason="prepare_failed")
            == 1
        )
    )
    wait_until(
        lambda: agent.value(f"{PREFIX}_approvals_total", outcome="skipped", reason="started") == 1
    )
    assert agent.value(f"{PREFIX}_events_late_total", type="Freeze") == 1
    assert agent.value(f"{PREFIX}_hook_runs_total", phase="prepare", outcome="failed") == 1
    wait_until(lambda: agent.value(f"{PREFIX}_pending_events_prepare_failed") == 1)


def test_no_label_carries_an_event_id_or_a_vm_name(
    live: Emulator, tmp_path: Path, running: list[Running]
) -> None:
    running.append(agent := Running(tmp_path, live.url).start())
    ids = [live.add_event(type=kind)["EventId"] for kind in ("Reboot", "Freeze", "Odd")]
    wait_until(
        lambda: agent.value(f"{PREFIX}_events_seen_total", type="other", source="Platform") == 1
    )
    values = {
        value
        for family in agent.registry.collect()
        for sample in family.samples
        for value in sample.labels.values()
    }
    assert not values & {*ids, "web_4", "Odd"}


def test_metrics_and_healthz_are_served_and_pass_promtool(
    live: Emulator, tmp_path: Path, running: list[Running]
) -> None:
    agent = Running(tmp_path, live.url)
    server = MetricsServer("127.0.0.1:0", agent.registry, agent.daemon.health).start()
    try:
        before = requests.get(f"{server.url}/healthz", timeout=5)
        assert before.status_code == 503
        assert "no successful poll yet" in before.text
        running.append(agent.start())
        wait_until(lambda: requests.get(f"{server.url}/healthz", timeout=5).status_code == 200)
        live.add_event(type="Reboot")
        wait_until(
            lambda: (
                agent.value(f"{PREFIX}_approvals_total", outcome="succeeded", reason="posted") == 1
            )
        )
        scrape = requests.get(f"{server.url}/metrics", timeout=5)
        assert scrape.headers["Content-Type"].startswith("text/plain")
        assert f"{PREFIX}_polls_total" in scrape.text
        assert shutil.which("promtool"), "promtool is needed (.ci/run installs prometheus)"
        checked = subprocess.run(
            ["promtool", "check", "metrics"],
            input=scrape.text,
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout + checked.stderr == ""

        # Polls start failing, and a few intervals later /healthz says so and why.
        live.control("POST", "faults", {"status": 500, "count": 100_000})
        wait_until(lambda: agent.value(f"{PREFIX}_polls_total", outcome="failed") >= 1)  # type: ignore[operator]
        agent.clock.offset += 60
        unhealthy = requests.get(f"{server.url}/healthz", timeout=5)
        assert unhealthy.status_code == 503
        assert "500" in unhealthy.text
    finally:
        server.stop()


class NotifySocket:
    def __init__(self, address: str) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind("\0" + address[1:] if address.startswith("@") else address)
        self.socket.settimeout(10)

    def messages_until(self, wanted: str) -> list[str]:
        received = []
        while True:
            message = self.socket.recv(4096).decode()
            received.append(message)
            if wanted in message:
                return received


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_speaks_ready_watchdog_status_and_stopping(
    live: Emulator, tmp_path: Path, abstract: bool
) -> None:
    address = f"@sea-test-{id(tmp_path)}" if abstract else str(tmp_path / "notify.sock")
    receiver = NotifySocket(address)
    agent = Running(
        tmp_path,
        live.url,
        notify_environment={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "30000000"},
    ).start()
    try:
        first = receiver.messages_until("READY=1")
        assert first[-1] == "READY=1\nSTATUS=no events pending"
        receiver.messages_until("WATCHDOG=1")
        live.add_event(type="Reboot", not_before_in_seconds=900, co_tenant_approvals=1)
        status = receiver.messages_until("pending")
        assert status[-1] in (
            "STATUS=1 event pending; next in 15m",
            "STATUS=1 event pending; next in 14m",
        )
    finally:
        agent.close()
    assert "STOPPING=1" in "".join(receiver.messages_until("STOPPING=1"))
    receiver.socket.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.send(READY="1") is False


def test_run_serves_metrics_on_the_configured_address(live: Emulator, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = config_for(tmp_path, live.url, metrics={"listen": f"127.0.0.1:{port}"})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    with (tmp_path / "out.log").open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(tmp_path / "config.yaml")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:

            def healthy() -> bool:
                try:
                    return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok
                except requests.ConnectionError:
                    return False

            wait_until(healthy, timeout=30, interval=0.2)
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            assert f"{PREFIX}_build_info" in text
        finally:
            process.terminate()
            assert process.wait(timeout=30) == 0


def test_the_listener_serves_on_the_ipv6_loopback(
    live: Emulator, tmp_path: Path, running: list[Running]
) -> None:
    agent = Running(tmp_path, live.url)
    server = MetricsServer("[::1]:0", agent.registry, agent.daemon.health).start()
    try:
        assert server.url.startswith("http://[::1]:")
        answer = requests.get(f"{server.url}/metrics", timeout=5)
        assert answer.status_code == 200
        assert f"{PREFIX}_polls_total" in answer.text
    finally:
        server.stop()


def exposition(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_no_created_series_are_exported() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.hook_run("prepare", "succeeded", 1.5)
    metrics.approval("succeeded", "posted", 12.0)
    text = exposition(metrics)
    assert f"{PREFIX}_hook_runs_total" in text
    assert "_created" not in text


def test_without_a_fleet_no_fleet_error_series_exist() -> None:
    text = exposition(Metrics(CollectorRegistry()))
    assert f"{PREFIX}_fleet_errors_total{{" not in text


@pytest.mark.parametrize("backend", ["blob", "fleetlock"])
def test_with_a_fleet_only_its_backend_s_error_series_exist(backend: str) -> None:
    other = "fleetlock" if backend == "blob" else "blob"
    text = exposition(Metrics(CollectorRegistry(), fleet_backend=backend))
    assert f'{PREFIX}_fleet_errors_total{{backend="{backend}",reason="unreachable"}} 0.0' in text
    assert f'backend="{other}"' not in text


def test_the_readme_s_metrics_table_names_every_metric() -> None:
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    listed = set(re.findall(rf"^\| `({PREFIX}_[a-z_]+)", readme, re.MULTILINE))
    metrics = Metrics(CollectorRegistry(), fleet_backend="blob")
    # prometheus_client names a counter's family without its _total.
    defined = {
        f"{family.name}_total" if family.type == "counter" else family.name
        for family in metrics.registry.collect()
    }
    assert defined - listed == set(), "metrics missing from the README's table"
    assert listed - defined == set(), "the README lists metrics that do not exist"
