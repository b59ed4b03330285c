"""kill -9 of the real agent process at each point of the lifecycle, then a restart.

After the restart nothing is lost and no completed step is repeated: every event is prepared,
approved and recovered exactly once, except a hook killed mid-run, which runs again. The agent
is a separate process; points between two steps are reached with the daemon's failpoints (it
kills itself with SIGKILL there), points inside a hook by killing it while the hook blocks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.state import Store
from tests.agent_harness import calls, config_for
from tests.conftest import Emulator, wait_until


class AgentProcess:
    def __init__(self, directory: Path, imds_url: str, failpoint: str | None = None) -> None:
        data = config_for(directory, imds_url)
        del data["vm_name"]  # read from the emulator's instance metadata, as on Azure
        data["logging"] = {"format": "json"}
        self.config = directory / "config.yaml"
        self.config.write_text(yaml.safe_dump(data))
        environment = {**os.environ}
        environment.pop("SCHEDULED_EVENTS_AGENT_FAILPOINTS", None)
        if failpoint:
            environment["SCHEDULED_EVENTS_AGENT_FAILPOINTS"] = failpoint
        self.log = (directory / "agent.log").open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=environment,
        )

    def wait_killed(self) -> None:
        assert self.process.wait(timeout=30) == -signal.SIGKILL
        self.log.close()

    def kill(self) -> None:
        self.process.kill()
        self.wait_killed()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout=30)
        self.log.close()
        return status


@pytest.fixture
def processes() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        if agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait()
        agent.log.close()


def approvals(emulator: Emulator) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = emulator.control("GET", "approvals").json()
    return found


def state(directory: Path, event_id: str) -> str | None:
    store = Store(directory / "state.db", read_only=True)
    try:
        record = store.get(event_id)
        return record.state if record else None
    finally:
        store.close()


def kill_hook(directory: Path, tag: str) -> None:
    """Kill a blocked hook's process group, as systemd does with a dead service's processes."""
    group = int((directory / f"pid-{tag}").read_text())
    os.killpg(group, signal.SIGKILL)
    (directory / f"pid-{tag}").unlink()


def finish(directory: Path, live: Emulator, event_id: str, processes: list[AgentProcess]) -> None:
    """Restart the agent, let the event run to its end, and stop the agent cleanly."""
    processes.append(agent := AgentProcess(directory, live.url))
    # Wait for the restarted agent to take every step it has to before the event ends.
    settled = {"approved", "waiting", "recovering", "done"}
    wait_until(lambda: state(directory, event_id) in settled, timeout=30)
    if any(
        event["EventId"] == event_id for event in live.control("GET", "events").json()["Events"]
    ):
        live.control("POST", f"events/{event_id}/complete")
    wait_until(lambda: state(directory, event_id) == "done", timeout=30)
    assert agent.stop() == 0


def assert_exactly_once(directory: Path, event_id: str, live: Emulator, **extra: int) -> None:
    lines = calls(directory)
    expected = {
        f"start prepare Reboot {event_id}": 1,
        f"end prepare Reboot {event_id}": 1,
        f"start recover Reboot {event_id}": 1,
        f"end recover Reboot {event_id}": 1,
    }
    for phase, count in extra.items():
        expected[f"start {phase} Reboot {event_id}"] = count
    assert {line: lines.count(line) for line in expected} == expected, lines
    assert [
        request["EventId"] for a in approvals(live) for request in a["body"]["StartRequests"]
    ] == [event_id]


def test_killed_before_the_prepare_hooks(
    live: Emulator, tmp_path: Path, processes: list[AgentProcess]
) -> None:
    processes.append(agent := AgentProcess(tmp_path, live.url, "before-prepare-hooks"))
    event_id = live.add_event(type="Reboot", not_before_in_seconds=120)["EventId"]
    agent.wait_killed()
    assert state(tmp_path, event_id) == "preparing"
    assert calls(tmp_path) == []
    finish(tmp_path, live, event_id, processes)
    assert_exactly_once(tmp_path, event_id, live)


def test_killed_during_a_prepare_hook_runs_that_hook_again(
    live: Emulator, tmp_path: Path, processes: list[AgentProcess]
) -> None:
    (tmp_path / "block-prepare-Reboot").touch()
    processes.append(agent := AgentProcess(tmp_path, live.url))
    event_id = live.add_event(type="Reboot", not_before_in_seconds=120)["EventId"]
    wait_until((tmp_path / "pid-prepare-Reboot").exists, timeout=30)
    agent.kill()
    kill_hook(tmp_path, "prepare-Reboot")
    (tmp_path / "block-prepare-Reboot").unlink()
    finish(tmp_path, live, event_id, processes)
    assert_exactly_once(tmp_path, event_id, live, prepare=2)


def test_a_hook_left_running_by_a_killed_agent_is_stopped_before_it_runs_again(
    live: Emulator, tmp_path: Path, processes: list[AgentProcess]
) -> None:
    # No systemd here to kill the dead agent's process group: the restarted agent must.
    (tmp_path / "block-prepare-Reboot").touch()
    processes.append(agent := AgentProcess(tmp_path, live.url))
    live.add_event(type="Reboot", not_before_in_seconds=120)
    wait_until((tmp_path / "pid-prepare-Reboot").exists, timeout=30)
    orphan = int((tmp_path / "pid-prepare-Reboot").read_text())
    (tmp_path / "pid-prepare-Reboot").unlink()
    agent.kill()
    os.killpg(orphan, 0)  # the hook outlived the agent
    processes.append(AgentProcess(tmp_path, live.url))

    def group_gone() -> bool:
        try:
            os.killpg(orphan, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(group_gone, timeout=30)
    # Only then does the hook start again, so its two runs never overlap.
    wait_until((tmp_path / "pid-prepare-Reboot").exists, timeout=30)
    starts = [line for line in calls(tmp_path) if line.startswith("start prepare")]
    assert len(starts) == 2
    (tmp_path / "block-prepare-Reboot").unlink()


def test_killed_between_the_hooks_and_the_approval(
    live: Emulator, tmp_path: Path, processes: list[AgentProcess]
) -> None:
    processes.append(agent := AgentProcess(tmp_path, live.url, "after-prepare"))
    event_id = live.add_event(type="Reboot", not_before_in_seconds=120)["EventId"]
    agent.wait_killed()
    assert approvals(live) == []
    finish(tmp_path, live, event_id, processes)
    assert_exactly_once(tmp_path, event_id, live)


def test_killed_after_the_approval_landed_does_not_approve_again(
    live: Emulator, tmp_path: Path, processes: list[AgentProcess]
) -> None:
    processes.append(agent := AgentProcess(tmp_path, live.url, "after-approval"))
    event_id = live.add_event(type="Reboot", not_before_in_seconds=120)["EventId"]
    agent.wait_killed()
    assert len(approvals(live)) == 1
    # The VM reboots while the agent is down: the event is over before it comes back.
    live.control("POST", f"events/{event_id}/complete")
    finish(tmp_path, live, event_id, processes)
    assert_exactly_once(tmp_path, event_id, live)


def test_killed_after_the_approval_with_the_event_still_pending(
    live: Emulator, tmp_path: Path, processes: list[AgentProcess]
) -> None:
    processes.append(agent := AgentProcess(tmp_path, live.url, "after-approval"))
    event_id = live.add_event(type="Reboot", not_before_in_seconds=120, co_tenant_approvals=1)[
        "EventId"
    ]
    agent.wait_killed()
    # Co-tenants hold the event back: it is still Scheduled when the agent restarts.
    finish(tmp_path, live, event_id, processes)
    assert_exactly_once(tmp_path, event_id, live)


def test_killed_during_a_recover_hook_runs_that_hook_again(
    live: Emulator, tmp_path: Path, processes: list[AgentProcess]
) -> None:
    (tmp_path / "block-recover-Reboot").touch()
    processes.append(agent := AgentProcess(tmp_path, live.url))
    event_id = live.add_event(type="Reboot", not_before_in_seconds=120)["EventId"]
    wait_until(lambda: len(approvals(live)) == 1, timeout=30)
    live.control("POST", f"events/{event_id}/complete")
    wait_until((tmp_path / "pid-recover-Reboot").exists, timeout=30)
    agent.kill()
    kill_hook(tmp_path, "recover-Reboot")
    (tmp_path / "block-recover-Reboot").unlink()
    finish(tmp_path, live, event_id, processes)
    assert_exactly_once(tmp_path, event_id, live, recover=2)


def test_killed_before_the_recover_hooks(
    live: Emulator, tmp_path: Path, processes: list[AgentProcess]
) -> None:
    processes.append(agent := AgentProcess(tmp_path, live.url, "before-recover-hooks"))
    event_id = live.add_event(type="Reboot", not_before_in_seconds=120)["EventId"]
    wait_until(lambda: len(approvals(live)) == 1, timeout=30)
    live.control("POST", f"events/{event_id}/complete")
    agent.wait_killed()
    assert state(tmp_path, event_id) == "recovering"
    finish(tmp_path, live, event_id, processes)
    assert_exactly_once(tmp_path, event_id, live)
