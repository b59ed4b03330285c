"""The daemon against the real emulator, with real hook scripts and a real SQLite file."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.lifecycle import DONE, IGNORED, WAITING
from tests.agent_harness import RunningAgent, build_agent, calls, start_agent, state_of
from tests.conftest import Emulator, approved_ids, wait_until


@pytest.fixture
def agents() -> Iterator[list[RunningAgent]]:
    running: list[RunningAgent] = []
    yield running
    for agent in running:
        agent.close()


def approvals(emulator: Emulator) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = emulator.control("GET", "approvals").json()
    return found


def test_an_event_for_this_vm_is_prepared_approved_and_recovered(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url))
    event = live.add_event(type="Reboot", not_before_in_seconds=120, started_for_seconds=0.5)
    wait_until(lambda: approved_ids(live) == [event["EventId"]])
    wait_until(lambda: state_of(agent, event["EventId"]) == DONE)
    assert calls(tmp_path) == [
        f"start prepare Reboot {event['EventId']}",
        f"end prepare Reboot {event['EventId']}",
        f"start recover Reboot {event['EventId']}",
        f"end recover Reboot {event['EventId']}",
    ]
    assert [run.outcome for run in agent.store.hook_runs(event["EventId"].lower())] == [
        "succeeded",
        "succeeded",
    ]


def test_events_of_other_vms_are_recorded_and_ignored(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url))
    other = live.add_event(type="Reboot", resources=["web_5"])
    wait_until(lambda: state_of(agent, other["EventId"]) == IGNORED)
    live.control("DELETE", f"events/{other['EventId']}")
    wait_until(lambda: state_of(agent, other["EventId"]) == DONE)
    assert calls(tmp_path) == []
    assert approvals(live) == []


def test_disabled_types_get_no_hooks_and_no_approval(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url, events={"types": ["Reboot"]}))
    freeze = live.add_event(type="Freeze")
    wait_until(lambda: state_of(agent, freeze["EventId"]) == IGNORED)
    record = agent.store.get(freeze["EventId"])
    assert record is not None and "events.types" in record.reason
    assert calls(tmp_path) == []
    assert approvals(live) == []


def test_a_shared_event_is_prepared_but_not_approved(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url))
    with capture_logs() as logs:
        shared = live.add_event(type="Reboot", resources=["web_4", "web_5"])
        wait_until(lambda: state_of(agent, shared["EventId"]) == WAITING)
    assert calls(tmp_path)[-1] == f"end prepare Reboot {shared['EventId']}"
    assert approvals(live) == []
    (decision,) = [log for log in logs if log["event"] == "event.approval_decision"]
    assert decision["approve"] is False
    assert "web_5" in decision["reason"] and "release them too" in decision["reason"]


def test_a_shared_event_is_approved_when_configured(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(start_agent(tmp_path, live.url, approval={"shared_events": "approve"}))
    shared = live.add_event(type="Reboot", resources=["web_4", "web_5"])
    wait_until(lambda: approved_ids(live) == [shared["EventId"]])


def test_mode_never_runs_hooks_and_never_approves(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url, approval={"mode": "never"}))
    event = live.add_event(type="Redeploy")
    wait_until(lambda: state_of(agent, event["EventId"]) == WAITING)
    assert len(calls(tmp_path)) == 2
    assert approvals(live) == []


def test_a_failed_prepare_hook_stops_the_phase_and_blocks_approval(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    (tmp_path / "fail-prepare-Reboot").touch()
    second = tmp_path / "prepare.d" / "20-never"
    agents.append(agent := start_agent(tmp_path, live.url))
    second.write_text(f"#!/bin/sh\ntouch {tmp_path}/second-ran\n")
    second.chmod(0o755)
    event = live.add_event(type="Reboot")
    wait_until(lambda: state_of(agent, event["EventId"]) == WAITING)
    assert not (tmp_path / "second-ran").exists()
    assert approvals(live) == []
    record = agent.store.get(event["EventId"])
    assert record is not None and record.decision is not None
    assert "prepare hooks failed" in record.decision
    (run,) = agent.store.hook_runs(event["EventId"].lower())
    assert (run.outcome, run.exit_status, run.output_tail) == ("failed", 3, "failing on purpose\n")


def test_mode_always_approves_even_after_a_failed_hook(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    (tmp_path / "fail-prepare-Reboot").touch()
    agents.append(start_agent(tmp_path, live.url, approval={"mode": "always"}))
    event = live.add_event(type="Reboot")
    wait_until(lambda: approved_ids(live) == [event["EventId"]])


def test_an_event_first_seen_started_is_prepared_not_approved_then_recovered(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url))
    event = live.add_event(type="Reboot", status="Started")
    wait_until(lambda: state_of(agent, event["EventId"]) == WAITING)
    assert approvals(live) == []
    live.control("POST", f"events/{event['EventId']}/complete")
    wait_until(lambda: state_of(agent, event["EventId"]) == DONE)
    assert [line.split()[:2] for line in calls(tmp_path)] == [
        ["start", "prepare"],
        ["end", "prepare"],
        ["start", "recover"],
        ["end", "recover"],
    ]


def test_a_cancelled_event_that_was_prepared_is_recovered(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url, approval={"mode": "never"}))
    event = live.add_event(type="Redeploy")
    wait_until(lambda: state_of(agent, event["EventId"]) == WAITING)
    live.control("DELETE", f"events/{event['EventId']}")
    wait_until(lambda: state_of(agent, event["EventId"]) == DONE)
    assert calls(tmp_path)[-1] == f"end recover Redeploy {event['EventId']}"


def test_a_preempt_is_approved_while_a_long_reboot_hook_runs(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    (tmp_path / "block-prepare-Reboot").touch()
    agents.append(agent := start_agent(tmp_path, live.url))
    reboot = live.add_event(type="Reboot")
    wait_until((tmp_path / "pid-prepare-Reboot").exists)
    preempt = live.add_event(type="Preempt", not_before_in_seconds=30)
    wait_until(lambda: approved_ids(live) == [preempt["EventId"]])
    # The Reboot hook is still running all along.
    assert f"end prepare Reboot {reboot['EventId']}" not in calls(tmp_path)
    (tmp_path / "block-prepare-Reboot").unlink()
    wait_until(lambda: approved_ids(live) == [preempt["EventId"], reboot["EventId"]])
    assert state_of(agent, reboot["EventId"]) is not None


def test_an_unchanged_document_writes_nothing(live: Emulator, tmp_path: Path) -> None:
    agent = build_agent(tmp_path, live.url, approval={"mode": "never"})
    try:
        live.add_event(type="Freeze", resources=["web_9"])
        assert agent.daemon.poll()
        written = agent.store.changes()
        for _ in range(20):
            assert agent.daemon.poll()
        assert agent.store.changes() == written
    finally:
        agent.close()


def test_a_dry_run_runs_no_hook_and_posts_nothing_but_says_what_it_would_do(
    live: Emulator, tmp_path: Path
) -> None:
    agent = build_agent(tmp_path, live.url, dry_run=True)
    try:
        event = live.add_event(type="Reboot")
        with capture_logs() as logs:
            assert agent.daemon.run_once() == 0
    finally:
        agent.close()
    assert calls(tmp_path) == []
    assert approvals(live) == []
    names = [log["event"] for log in logs]
    assert "hook.would_run" in names
    assert "event.would_approve" in names
    assert not (tmp_path / "state.db").exists()
    assert event["EventId"] in {log.get("event_id") for log in logs}


def test_a_failed_approval_is_retried_and_posted_once(live: Emulator, tmp_path: Path) -> None:
    (tmp_path / "block-prepare-Reboot").touch()
    agent = build_agent(tmp_path, live.url)
    try:
        event = live.add_event(type="Reboot")
        result: list[int] = []
        once = threading.Thread(target=lambda: result.append(agent.daemon.run_once()))
        once.start()
        wait_until((tmp_path / "pid-prepare-Reboot").exists)
        # The only requests from now on are the approval's: each fault meets one attempt.
        live.control("POST", "faults", {"status": 500, "count": 2})
        live.control("POST", "faults", {"drop": True, "count": 1})
        (tmp_path / "block-prepare-Reboot").unlink()
        once.join(timeout=30)
        assert result == [0]
        assert approved_ids(live) == [event["EventId"]]
        (approval,) = agent.store.approvals(event["EventId"].lower())
        assert approval.outcome == "succeeded"
    finally:
        agent.close()


def test_an_approval_refused_by_imds_is_recorded_not_repeated(
    live: Emulator, tmp_path: Path
) -> None:
    (tmp_path / "block-prepare-Reboot").touch()
    agent = build_agent(tmp_path, live.url)
    try:
        event = live.add_event(type="Reboot")
        once = threading.Thread(target=agent.daemon.run_once)
        once.start()
        wait_until((tmp_path / "pid-prepare-Reboot").exists)
        live.control("POST", "faults", {"status": 400, "count": 1})
        (tmp_path / "block-prepare-Reboot").unlink()
        once.join(timeout=30)
        (approval,) = agent.store.approvals(event["EventId"].lower())
        assert approval.outcome == "refused"
        assert state_of(agent, event["EventId"]) == WAITING
    finally:
        agent.close()


@pytest.mark.parametrize(
    "fault",
    [
        {"status": 500, "count": 30},
        {"status": 429, "count": 30},
        {"status": 410, "count": 30},
        {"body": "not json", "count": 5},
        {"body": '{"DocumentIncarnation": 1, "Events": [{"EventId": 5}]}', "count": 5},
        {"drop": True, "count": 10},
        {"delay_seconds": 6, "count": 1},
    ],
)
def test_imds_faults_never_stop_the_agent(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent], fault: dict[str, Any]
) -> None:
    with capture_logs() as logs:
        live.control("POST", "faults", fault)
        agents.append(agent := start_agent(tmp_path, live.url))
        event = live.add_event(type="Reboot")
        wait_until(lambda: approved_ids(live) == [event["EventId"]], timeout=30)
    assert agent.thread is not None and agent.thread.is_alive()
    failures = [log for log in logs if log["event"] == "imds.poll_failed"]
    recoveries = [log for log in logs if log["event"] == "imds.poll_recovered"]
    # Short faults are absorbed by the client's retries; longer ones fail polls. Either way a
    # failure that repeats is logged once, and its recovery once.
    assert len(failures) <= 1
    assert len(recoveries) == len(failures)


def test_a_repeated_poll_failure_is_logged_once_and_its_recovery_once(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    with capture_logs() as logs:
        live.control("POST", "faults", {"status": 503, "count": 80})
        agents.append(start_agent(tmp_path, live.url))
        wait_until(
            lambda: live.control("GET", "stats").json()["requests"] > 80, timeout=60, interval=0.2
        )
        event = live.add_event(type="Reboot")
        wait_until(lambda: approved_ids(live) == [event["EventId"]], timeout=30)
    failures = [log for log in logs if log["event"] == "imds.poll_failed"]
    recoveries = [log for log in logs if log["event"] == "imds.poll_recovered"]
    assert len(failures) == 1
    assert "503" in failures[0]["reason"]
    assert len(recoveries) == 1
