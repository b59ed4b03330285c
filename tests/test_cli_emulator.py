"""``scheduled-events-agent emulator`` as a real process: the URL it prints, curl, signals."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from agent import __version__
from tests.conftest import wait_until

API = "2020-07-01"


class EmulatorProcess:
    def __init__(self, *arguments: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "emulator", "--port", "0", *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        first = self.next_line()
        match = re.search(r"serving (http://127\.0\.0\.1:\d+)", first)
        assert match, first
        self.url = match.group(1)
        self.banner = first

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def next_line(self, timeout: float = 20) -> str:
        return self.lines.get(timeout=timeout)

    def stop(self, signal_number: int = signal.SIGTERM) -> int:
        self.process.send_signal(signal_number)
        return self.process.wait(timeout=20)

    def close(self) -> str:
        """Kill the process if it still runs, close its pipes, return what it wrote to stderr."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=20)
        assert self.process.stderr is not None and self.process.stdout is not None
        errors = self.process.stderr.read()
        self.process.stderr.close()
        self.process.stdout.close()
        return errors


@pytest.fixture
def emulator_process() -> Iterator[EmulatorProcess]:
    process = EmulatorProcess()
    yield process
    process.close()


def run_agent(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run the command to completion; its exit status is the test's to check."""
    return subprocess.run(
        [sys.executable, "-m", "agent", *arguments],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def curl(*arguments: str) -> str:
    completed = subprocess.run(
        ["curl", "-s", *arguments], capture_output=True, text=True, timeout=20, check=True
    )
    return completed.stdout


def test_the_documented_curl_lines_work_unchanged_but_for_host_and_port(
    emulator_process: EmulatorProcess,
) -> None:
    url = emulator_process.url
    created = requests.post(f"{url}/emulator/events", json={"type": "Reboot"}, timeout=5).json()
    event_id = created["EventId"]

    document = json.loads(
        curl("-H", "Metadata:true", f"{url}/metadata/scheduledevents?api-version={API}")
    )
    assert [event["EventId"] for event in document["Events"]] == [event_id]

    body = '{"StartRequests": [{"EventId": "' + event_id + '"}]}'
    curl(
        "-H",
        "Metadata:true",
        "-X",
        "POST",
        "-d",
        body,
        f"{url}/metadata/scheduledevents?api-version={API}",
    )
    approvals = requests.get(f"{url}/emulator/approvals", timeout=5).json()
    assert [approval["body"]["StartRequests"] for approval in approvals] == [
        [{"EventId": event_id}]
    ]
    after = json.loads(
        curl("-H", "Metadata:true", f"{url}/metadata/scheduledevents?api-version={API}")
    )
    assert after["Events"][0]["EventStatus"] == "Started"


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_the_emulator_stops_cleanly_on_sigterm_and_sigint(signal_number: int) -> None:
    emulator = EmulatorProcess()
    try:
        assert emulator.stop(signal_number) == 0
        assert "stopped" in emulator.next_line()
    finally:
        assert emulator.close() == ""


def test_a_named_scenario_plays_at_the_time_scale() -> None:
    # preempt: 30 s notice and 120 s started; at x30 that is 1 s and 4 s.
    emulator = EmulatorProcess("--scenario", "preempt", "--time-scale", "30")
    assert "scenario preempt at x30" in emulator.banner
    try:
        session = requests.Session()
        session.trust_env = False

        def events() -> list[dict[str, Any]]:
            response = session.get(
                f"{emulator.url}/metadata/scheduledevents",
                params={"api-version": API},
                headers={"Metadata": "true"},
                timeout=5,
            )
            found: list[dict[str, Any]] = response.json()["Events"]
            return found

        (scheduled,) = events()
        assert (scheduled["EventType"], scheduled["EventStatus"]) == ("Preempt", "Scheduled")
        seen: list[list[dict[str, Any]]] = []

        def started() -> bool:
            seen.append(events())
            return [event["EventStatus"] for event in seen[-1]] == ["Started"]

        # Polled three times a second: the emulator keeps IMDS's limit of five.
        wait_until(started, interval=0.33)
        assert seen[-1][0]["EventId"] == scheduled["EventId"]
        assert seen[-1][0]["NotBefore"] == ""
        wait_until(lambda: events() == [], interval=0.33)
        assert emulator.stop() == 0
    finally:
        emulator.close()


def test_an_unknown_scenario_is_a_usage_error() -> None:
    completed = run_agent("emulator", "--port", "0", "--scenario", "nope")
    assert completed.returncode == 2
    assert "nope" in completed.stderr
    assert "preempt" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_a_bad_scenario_file_is_a_usage_error_naming_the_step(tmp_path: Path) -> None:
    scenario = tmp_path / "bad.yaml"
    scenario.write_text("steps:\n  - at: 0\n    add: {type: Reboot, status: Done}\n")
    completed = run_agent("emulator", "--port", "0", "--scenario", str(scenario))
    assert completed.returncode == 2
    assert "status" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_a_port_in_use_is_reported_without_a_traceback() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        completed = run_agent("emulator", "--port", str(port))
    assert completed.returncode == 1
    assert f"127.0.0.1:{port}" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize(
    "arguments", [["--time-scale", "0"], ["--first-call-delay", "-1"], ["--rate-limit", "-2"]]
)
def test_bad_options_are_usage_errors(arguments: list[str]) -> None:
    completed = run_agent("emulator", "--port", "0", *arguments)
    assert completed.returncode == 2
    assert arguments[0] in completed.stderr


def test_version_prints_the_version() -> None:
    completed = run_agent("--version")
    assert completed.returncode == 0
    assert completed.stdout.strip() == f"scheduled-events-agent {__version__}"


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_a_port_out_of_range_is_a_usage_error(port: str) -> None:
    completed = run_agent("emulator", "--port", port)
    assert completed.returncode == 2
    assert "--port" in completed.stderr and "65535" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_an_address_this_machine_lacks_is_named_without_a_traceback() -> None:
    # 203.0.113.0/24 is reserved for documentation: no machine has it, and bind sends nothing.
    completed = run_agent("emulator", "--host", "203.0.113.7", "--port", "0")
    assert completed.returncode == 1
    assert "--host 203.0.113.7" in completed.stderr
    assert "--port 0" not in completed.stderr  # another port would not help
    assert "Traceback" not in completed.stderr
