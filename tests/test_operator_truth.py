"""What the operator is told mid-incident: the announced NotBefore kept after the start, a
cancellation told from a completion, an event approved by someone else, and no false alarms."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent import report
from agent.lifecycle import DONE, PREPARING
from agent.metrics import PREFIX
from tests.agent_harness import RunningAgent, start_agent, state_of
from tests.conftest import Emulator, approved_ids, wait_until
from tests.test_cli_agent import agent as command
from tests.test_cli_agent import log_events, write_config
from tests.test_never_down import free_port


@pytest.fixture
def agents() -> Iterator[list[RunningAgent]]:
    started: list[RunningAgent] = []
    yield started
    for running in started:
        running.close()


def metric(agent: RunningAgent, name: str, **labels: str) -> float:
    assert agent.metrics is not None
    return agent.metrics.registry.get_sample_value(name, labels) or 0.0


def summary(agent: RunningAgent, event_id: str) -> dict[str, Any]:
    """What history shows of the event; empty before it is recorded."""
    found = [e for e in report.history(agent.store, 50) if e["event_id"] == event_id]
    return found[0] if found else {}


def test_the_announced_not_before_is_kept_once_the_event_started(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url))
    event = live.add_event(type="Reboot", not_before_in_seconds=600)
    announced = event["NotBefore"]
    wait_until(lambda: approved_ids(live) == [event["EventId"]])
    # The approval starts it: IMDS now shows NotBefore "".
    wait_until(lambda: summary(agent, event["EventId"]).get("status") == "Started")
    shown = summary(agent, event["EventId"])
    expected = datetime.strptime(announced, "%a, %d %b %Y %H:%M:%S %Z").replace(tzinfo=timezone.utc)
    assert shown["not_before"] is not None
    assert datetime.fromisoformat(shown["not_before"]) == expected
    (pending,) = report.status(agent.store)["events"]
    assert pending["not_before"] == shown["not_before"]
    assert "NotBefore -" not in report.status_text(report.status(agent.store))

    live.control("POST", f"events/{event['EventId']}/complete")
    wait_until(lambda: state_of(agent, event["EventId"]) == DONE)
    after = summary(agent, event["EventId"])
    assert after["not_before"] == shown["not_before"]
    assert after["ending"] == "completed"
    text = report.history_text([after])
    assert "Started" not in text.splitlines()[0]
    assert "completed" in text.splitlines()[0]


def test_a_cancellation_is_told_from_a_completion(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url, approval={"mode": "never"}))
    with capture_logs() as logs:
        cancelled = live.add_event(type="Freeze", not_before_in_seconds=600)
        completed = live.add_event(type="Reboot", not_before_in_seconds=600)
        wait_until(lambda: state_of(agent, completed["EventId"]) == "waiting")
        wait_until(lambda: state_of(agent, cancelled["EventId"]) == "waiting")
        live.control("DELETE", f"events/{cancelled['EventId']}")
        live.control("POST", f"events/{completed['EventId']}/start")
        wait_until(lambda: summary(agent, completed["EventId"]).get("status") == "Started")
        live.control("POST", f"events/{completed['EventId']}/complete")
        wait_until(lambda: state_of(agent, cancelled["EventId"]) == DONE)
        wait_until(lambda: state_of(agent, completed["EventId"]) == DONE)
    gone = {log["event_id"]: log for log in logs if log["event"] == "event.gone"}
    assert gone[cancelled["EventId"]]["ending"] == "cancelled"
    assert gone[completed["EventId"]]["ending"] == "completed"
    assert summary(agent, cancelled["EventId"])["ending"] == "cancelled"
    assert summary(agent, completed["EventId"])["ending"] == "completed"
    ended = f"{PREFIX}_events_ended_total"
    assert metric(agent, ended, type="Freeze", ending="cancelled") == 1
    assert metric(agent, ended, type="Reboot", ending="completed") == 1
    assert metric(agent, ended, type="Reboot", ending="cancelled") == 0


def test_an_event_approved_elsewhere_is_recorded_counted_and_logged(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url, approval={"mode": "never"}))
    with capture_logs() as logs:
        event = live.add_event(type="Reboot", not_before_in_seconds=600)
        wait_until(lambda: state_of(agent, event["EventId"]) == "waiting")
        answer = live.control("POST", f"events/{event['EventId']}/approve-elsewhere")
        assert answer.status_code == 200, answer.text
        assert answer.json()["EventStatus"] == "Started"
        wait_until(lambda: summary(agent, event["EventId"]).get("status") == "Started")
    assert approved_ids(live) == []  # not through IMDS: no approval POST on record
    (told,) = [log for log in logs if log["event"] == "event.approved_elsewhere"]
    assert told["event_id"] == event["EventId"]
    assert told["prepare_finished"] is True
    shown = summary(agent, event["EventId"])
    assert shown["approved_elsewhere"] is True
    assert [a["source"] for a in shown["approvals"]] == ["elsewhere"]
    assert "approved elsewhere" in report.history_text([shown])
    assert metric(agent, f"{PREFIX}_events_approved_elsewhere_total", type="Reboot") == 1


def test_approved_elsewhere_while_prepare_hooks_run_says_the_maintenance_began_first(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    (tmp_path / "block-prepare-Reboot").touch()
    agents.append(agent := start_agent(tmp_path, live.url))
    with capture_logs() as logs:
        event = live.add_event(type="Reboot", not_before_in_seconds=600)
        wait_until((tmp_path / "pid-prepare-Reboot").exists)
        live.control("POST", f"events/{event['EventId']}/approve-elsewhere")
        wait_until(lambda: summary(agent, event["EventId"]).get("status") == "Started")
        (tmp_path / "block-prepare-Reboot").unlink()
        wait_until(lambda: state_of(agent, event["EventId"]) != PREPARING)
    (told,) = [log for log in logs if log["event"] == "event.approved_elsewhere"]
    assert told["prepare_finished"] is False
    assert told["log_level"] == "warning"
    assert "before its prepare hooks finished" in told["consequence"]
    assert approved_ids(live) == []  # and the agent posts nothing for a Started event


def test_an_event_started_at_not_before_is_not_approved_elsewhere(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url, approval={"mode": "never"}))
    with capture_logs() as logs:
        event = live.add_event(type="Freeze", not_before_in_seconds=1)
        wait_until(lambda: summary(agent, event["EventId"]).get("status") == "Started", timeout=15)
    assert not [log for log in logs if log["event"] == "event.approved_elsewhere"]
    assert summary(agent, event["EventId"])["approved_elsewhere"] is False


def test_the_emulator_s_approve_elsewhere_waits_for_co_tenants(live: Emulator) -> None:
    event = live.add_event(type="Reboot", co_tenant_approvals=1)
    first = live.control("POST", f"events/{event['EventId']}/approve-elsewhere").json()
    assert first["EventStatus"] == "Scheduled"
    second = live.control("POST", f"events/{event['EventId']}/co-tenant-approve").json()
    assert second["EventStatus"] == "Started"
    assert live.control("POST", "events/nope/approve-elsewhere").status_code == 404


def test_a_not_before_moved_later_is_the_one_kept(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url, approval={"mode": "never"}))
    event = live.add_event(type="Reboot", not_before_in_seconds=600)
    wait_until(lambda: state_of(agent, event["EventId"]) == "waiting")
    later = (datetime.now(timezone.utc) + timedelta(seconds=1200)).replace(microsecond=0)
    live.control("PATCH", f"events/{event['EventId']}", {"not_before": later.isoformat()})
    wait_until(lambda: summary(agent, event["EventId"]).get("not_before") == later.isoformat())
    live.control("POST", f"events/{event['EventId']}/start")
    wait_until(lambda: summary(agent, event["EventId"]).get("status") == "Started")
    assert summary(agent, event["EventId"])["not_before"] == later.isoformat()


# --dry-run, recoveries and planned stops, as the real process logs them ----------------------


def test_a_dry_run_once_says_so_and_never_claims_hooks_succeeded(
    live: Emulator, tmp_path: Path
) -> None:
    config = write_config(tmp_path, live.url)
    live.add_event(type="Reboot")
    completed = command("run", "--once", "--dry-run", "--config", str(config))
    assert completed.returncode == 0, completed.stderr
    logs = log_events(completed.stderr)
    (started,) = [entry for entry in logs if entry["event"] == "agent.started"]
    assert started["dry_run"] is True
    (decision,) = [entry for entry in logs if entry["event"] == "event.approval_decision"]
    assert decision["reason"].startswith("dry run: would approve")
    assert "prepare hooks succeeded" not in completed.stderr


def test_a_real_run_once_logs_agent_started_without_dry_run(live: Emulator, tmp_path: Path) -> None:
    config = write_config(tmp_path, live.url)
    completed = command("run", "--once", "--config", str(config))
    assert completed.returncode == 0, completed.stderr
    (started,) = [e for e in log_events(completed.stderr) if e["event"] == "agent.started"]
    assert started["dry_run"] is False


def test_one_recovery_of_imds_is_logged_once(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    with capture_logs() as logs:
        agents.append(start_agent(tmp_path, live.url))
        wait_until(lambda: any(log["event"] == "agent.started" for log in logs))
        # Longer than a poll's retry budget: the poll fails, then IMDS comes back.
        live.control("POST", "faults", {"status": 500, "count": 10_000})
        wait_until(lambda: any(log["event"] == "imds.poll_failed" for log in logs), timeout=30)
        live.control("POST", "reset")
        wait_until(lambda: any(log["event"] == "imds.poll_recovered" for log in logs), timeout=30)
        # And a blip that a retry rides out is logged once by the client, the poll never failing.
        blip_from = len(logs)
        live.control("POST", "faults", {"status": 500, "count": 1})
        wait_until(lambda: any(log["event"] == "imds.recovered" for log in logs[blip_from:]))
    names = [log["event"] for log in logs]
    assert names.count("imds.poll_recovered") == 1
    assert names[:blip_from].count("imds.recovered") == 0, "one recovery, two log lines"
    assert names[blip_from:].count("imds.poll_recovered") == 0


def test_a_planned_stop_logs_no_failed_hook_at_error_level(live: Emulator, tmp_path: Path) -> None:
    (tmp_path / "block-prepare-Reboot").touch()
    config = write_config(tmp_path, live.url)
    with (tmp_path / "out.log").open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            live.add_event(type="Reboot")
            wait_until((tmp_path / "pid-prepare-Reboot").exists, timeout=30)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
    logs = log_events((tmp_path / "out.log").read_text())
    assert not [entry for entry in logs if entry["event"] == "hook.failed"]
    assert not [entry for entry in logs if entry.get("level") == "error"]
    (interrupted,) = [entry for entry in logs if entry["event"] == "hook.interrupted"]
    assert interrupted["outcome"] == "interrupted"


# status, live from the running daemon ------------------------------------------------------


def status_json(config: Path) -> dict[str, Any]:
    completed = command("status", "--config", str(config), "--json")
    assert completed.returncode == 0, completed.stderr
    answer: dict[str, Any] = json.loads(completed.stdout)
    return answer


def test_status_is_live_while_the_daemon_runs_and_the_store_otherwise(
    live: Emulator, tmp_path: Path
) -> None:
    port = free_port()
    config = write_config(tmp_path, live.url, metrics={"listen": f"127.0.0.1:{port}"})
    with (tmp_path / "out.log").open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            event = live.add_event(type="Reboot", not_before_in_seconds=600)
            wait_until(lambda: approved_ids(live) == [event["EventId"]], timeout=30)
            # Other VMs' events: new incarnations, nothing for this agent to write down.
            for _ in range(3):
                live.add_event(type="Freeze", resources=["web_9"])
            incarnation = live.control("GET", "stats").json()["incarnation"]
            wait_until(lambda: status_json(config)["document_incarnation"] == incarnation)
            status = status_json(config)
            assert status["source"] == "live"
            assert status["pid"] == process.pid
            assert [e["event_id"] for e in status["events"]] == [event["EventId"]]
            text = command("status", "--config", str(config)).stdout
            assert f"live from the running agent (pid {process.pid})" in text
            assert f"incarnation {incarnation}" in text
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
    stored = status_json(config)
    assert stored["source"] == "store"
    assert [e["event_id"] for e in stored["events"]] == [event["EventId"]]
    text = command("status", "--config", str(config)).stdout
    assert f"no agent answering on 127.0.0.1:{port}" in text


def test_status_never_shows_a_dry_run_s_memory_as_this_state(
    live: Emulator, tmp_path: Path
) -> None:
    port = free_port()
    config = write_config(tmp_path, live.url, metrics={"listen": f"127.0.0.1:{port}"})
    assert command("run", "--once", "--config", str(config)).returncode == 0
    with (tmp_path / "out.log").open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--dry-run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            live.add_event(type="Reboot", not_before_in_seconds=600)
            wait_until(lambda: "event.would_approve" in (tmp_path / "out.log").read_text(), 30)
            status = status_json(config)
            assert status["source"] == "store"
            assert status["events"] == []
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
