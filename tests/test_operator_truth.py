"""What the operator is told mid-incident: the announced NotBefore kept after the start, a
cancellation told from a completion, an event approved by someone else, and no false alarms."""

from __future__ import annotations

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


@pytest.fixture
def agents() -> Iterator[list[RunningAgent]]:
    started: list[RunningAgent] = []
    yield started
    for agent in started:
        agent.close()


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
