"""The core promise, whatever the document does: never let maintenance hit an unprepared VM,
never act twice. Each test is a way the agent once broke it, against the real emulator (or a
stand-in server that serves any bytes), real hook scripts and a real SQLite file."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.lifecycle import APPROVING, DONE, IGNORED, RECOVERING, WAITING
from agent.state import occurrence_key
from tests.agent_harness import RunningAgent, build_agent, calls, start_agent, state_of
from tests.conftest import Emulator, approved_ids, wait_until
from tests.fleet_harness import FleetLockServer
from tests.standin import StandIn


@pytest.fixture
def agents() -> Iterator[list[RunningAgent]]:
    running: list[RunningAgent] = []
    yield running
    for agent in running:
        agent.close()


@pytest.fixture
def standin() -> Iterator[StandIn]:
    server = StandIn()
    yield server
    server.close()


def http_date(seconds_ahead: float) -> str:
    moment = datetime.now(timezone.utc) + timedelta(seconds=seconds_ahead)
    return moment.strftime("%a, %d %b %Y %H:%M:%S GMT")


def wire_event(event_id: str, **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "EventId": event_id,
        "EventStatus": "Scheduled",
        "EventType": "Reboot",
        "ResourceType": "VirtualMachine",
        "Resources": ["web_4"],
        "NotBefore": http_date(600),
        "Description": "Host server is undergoing maintenance.",
        "EventSource": "Platform",
        "DurationInSeconds": -1,
    }
    event.update(fields)
    return event


def sample(agent: RunningAgent, name: str, labels: dict[str, str] | None = None) -> float | None:
    assert agent.metrics is not None
    return agent.metrics.registry.get_sample_value(name, labels or {})


# 1. The decision is made again from the current document ----------------------------------


def test_an_ignored_freeze_that_becomes_a_reboot_is_prepared_and_approved(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url, events={"types": ["Reboot"]}))
    event = live.add_event(type="Freeze", not_before_in_seconds=600)
    event_id = event["EventId"]
    wait_until(lambda: state_of(agent, event_id) == IGNORED)
    live.control("PATCH", f"events/{event_id}", {"type": "Reboot"})
    wait_until(lambda: approved_ids(live) == [event_id])
    assert calls(tmp_path)[:2] == [
        f"start prepare Reboot {event_id}",
        f"end prepare Reboot {event_id}",
    ]
    record = agent.store.get(event_id)
    assert record is not None
    assert (record.event_type, record.reason) == ("Reboot", "names this VM")


def test_an_event_that_comes_to_name_this_vm_is_prepared_and_approved(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url))
    event = live.add_event(type="Reboot", resources=["web_5"], not_before_in_seconds=600)
    event_id = event["EventId"]
    wait_until(lambda: state_of(agent, event_id) == IGNORED)
    live.control("PATCH", f"events/{event_id}", {"resources": ["web_4"]})
    wait_until(lambda: approved_ids(live) == [event_id])
    assert f"end prepare Reboot {event_id}" in calls(tmp_path)
    record = agent.store.get(event_id)
    assert record is not None and "for other VMs" not in record.reason


def test_a_prepared_event_that_no_longer_names_this_vm_is_recovered(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url, approval={"mode": "never"}))
    event = live.add_event(type="Reboot", not_before_in_seconds=600)
    event_id = event["EventId"]
    wait_until(lambda: state_of(agent, event_id) == WAITING)
    live.control("PATCH", f"events/{event_id}", {"resources": ["web_5"]})
    wait_until(lambda: f"end recover Reboot {event_id}" in calls(tmp_path))
    # Still in the document for web_5: recorded again, as another VM's event.
    wait_until(lambda: state_of(agent, event_id) == IGNORED)
    assert agent.store.get(occurrence_key(event_id.lower(), 1)) is not None
    assert approved_ids(live) == []


def fleetlock_section(server: FleetLockServer) -> dict[str, Any]:
    return {"url": server.url, "backend": "fleetlock", "group": "web", "retry_seconds": 0.2}


def test_a_shared_event_that_waited_for_a_fleet_slot_is_decided_again_before_the_post(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    server = FleetLockServer(slots=1).start()
    try:
        server.holders["web"] = ["web_9"]  # another VM holds the only slot
        agents.append(agent := start_agent(tmp_path, live.url, fleet=fleetlock_section(server)))
        event = live.add_event(type="Reboot", not_before_in_seconds=600)
        event_id = event["EventId"]
        wait_until(lambda: state_of(agent, event_id) == APPROVING)
        # While it waits, the event grows to name another VM; then the slot frees.
        live.control("PATCH", f"events/{event_id}", {"resources": ["web_4", "web_5"]})
        wait_until(
            lambda: (r := agent.store.get(event_id)) is not None and "web_5" in r.event.resources
        )
        with server.lock:
            server.holders["web"] = []
        wait_until(lambda: state_of(agent, event_id) == WAITING)
        assert approved_ids(live) == []  # approving now would release web_5 unprepared
        record = agent.store.get(event_id)
        assert record is not None and record.decision is not None
        assert "shared with web_5" in record.decision
    finally:
        server.stop()


def test_mode_never_after_a_restart_means_never(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    server = FleetLockServer(slots=1).start()
    try:
        server.holders["web"] = ["web_9"]
        first = start_agent(tmp_path, live.url, fleet=fleetlock_section(server))
        event = live.add_event(type="Reboot", not_before_in_seconds=600)
        event_id = event["EventId"]
        try:
            wait_until(lambda: state_of(first, event_id) == APPROVING)
        finally:
            first.close()
        with server.lock:
            server.holders["web"] = []
        # The operator changes the configuration before the restart.
        agents.append(
            agent := start_agent(
                tmp_path, live.url, fleet=fleetlock_section(server), approval={"mode": "never"}
            )
        )
        wait_until(lambda: state_of(agent, event_id) == WAITING)
        assert approved_ids(live) == []
        record = agent.store.get(event_id)
        assert record is not None and record.decision == "approval.mode is never"
    finally:
        server.stop()


def test_a_not_before_that_moves_nearer_moves_the_running_hooks_deadline(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url, hooks={"timeout_seconds": 3600}))
    (tmp_path / "block-prepare-Reboot").touch()
    event = live.add_event(type="Reboot", not_before_in_seconds=1800)
    event_id = event["EventId"]
    wait_until((tmp_path / "pid-prepare-Reboot").exists)
    # Azure brings the maintenance forward while the drain runs: it must end by then.
    live.control("PATCH", f"events/{event_id}", {"not_before_in_seconds": 2})
    wait_until(
        lambda: (
            [run.outcome for run in agent.store.hook_runs(event_id, "prepare")] == ["timed_out"]
        ),
        timeout=20,
    )
    (run,) = agent.store.hook_runs(event_id, "prepare")
    started = datetime.fromisoformat(run.started_at)
    ended = datetime.fromisoformat(run.ended_at or "")
    assert (ended - started).total_seconds() < 60  # not the hour of hooks.timeout_seconds
    assert approved_ids(live) == []


# 2. An event's comings and goings -------------------------------------------------------------


def test_an_event_that_leaves_for_a_moment_is_not_recovered_while_pending(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(
        agent := start_agent(
            tmp_path, live.url, approval={"mode": "never"}, events={"gone_grace_seconds": 30}
        )
    )
    event = live.add_event(type="Reboot", not_before_in_seconds=600)
    event_id = event["EventId"]
    wait_until(lambda: state_of(agent, event_id) == WAITING)
    changed = {"outcome": "changed"}

    def handled() -> float:
        return sample(agent, "scheduled_events_agent_polls_total", changed) or 0.0

    with capture_logs() as logs:
        before = handled()
        live.control("DELETE", f"events/{event_id}")
        # The agent has read the document without it...
        wait_until(lambda: handled() > before)
        before = handled()
        # ...and it is back, the same event, still Scheduled.
        live.add_event(type="Reboot", event_id=event_id, not_before_in_seconds=600)
        wait_until(lambda: handled() > before)
    assert state_of(agent, event_id) == WAITING
    assert not [line for line in calls(tmp_path) if "recover" in line]
    assert not [log for log in logs if log["event"] in ("event.gone", "event.reappeared")]


def test_an_event_is_gone_once_missing_for_the_grace(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url, approval={"mode": "never"}))
    event = live.add_event(type="Reboot", not_before_in_seconds=600)
    event_id = event["EventId"]
    wait_until(lambda: state_of(agent, event_id) == WAITING)
    with capture_logs() as logs:
        live.control("DELETE", f"events/{event_id}")
        wait_until(lambda: state_of(agent, event_id) == DONE)
    (gone,) = [log for log in logs if log["event"] == "event.gone"]
    assert gone["absent_seconds"] >= 0.6  # the harness's events.gone_grace_seconds
    assert f"end recover Reboot {event_id}" in calls(tmp_path)


def test_run_once_polls_through_the_grace_and_recovers_an_event_that_left(
    live: Emulator, tmp_path: Path
) -> None:
    event = live.add_event(type="Reboot", not_before_in_seconds=600)
    first = build_agent(tmp_path, live.url, approval={"mode": "never"})
    try:
        assert first.daemon.run_once() == 0
    finally:
        first.close()
    live.control("DELETE", f"events/{event['EventId']}")
    second = build_agent(tmp_path, live.url, approval={"mode": "never"})
    try:
        assert second.daemon.run_once() == 0
        assert state_of(second, event["EventId"]) == DONE
    finally:
        second.close()
    assert calls(tmp_path)[-1] == f"end recover Reboot {event['EventId']}"


def test_an_event_id_that_comes_back_after_it_was_over_is_worked_again(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url))
    event = live.add_event(type="Reboot", not_before_in_seconds=600, started_for_seconds=0.2)
    event_id = event["EventId"]
    wait_until(lambda: state_of(agent, event_id) == DONE)
    live.add_event(type="Reboot", event_id=event_id, not_before_in_seconds=600)
    wait_until(lambda: approved_ids(live) == [event_id, event_id])
    assert calls(tmp_path).count(f"end prepare Reboot {event_id}") == 2
    first = agent.store.get(occurrence_key(event_id.lower(), 1))
    second = agent.store.get(event_id)
    assert first is not None and first.state == DONE and first.occurrence == 1
    assert second is not None and second.occurrence == 2


def test_an_event_id_that_looks_like_a_kept_occurrence_takes_nothing_from_it(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url))
    live.add_event(type="Reboot", event_id="E", started_for_seconds=0.2)
    wait_until(lambda: state_of(agent, "E") == DONE)
    live.add_event(type="Reboot", event_id="E#1", started_for_seconds=0.2)
    wait_until(lambda: approved_ids(live) == ["E", "E#1"])
    live.add_event(type="Reboot", event_id="E", not_before_in_seconds=600)
    wait_until(lambda: approved_ids(live) == ["E", "E#1", "E"])
    kept = agent.store.get(occurrence_key("e", 1))
    again = agent.store.get("e")
    assert kept is not None and kept.state == DONE
    assert again is not None and again.occurrence == 2
    assert agent.thread is not None and agent.thread.is_alive()


def test_recover_hooks_wait_while_another_event_is_prepared_or_approved(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url))
    freeze = live.add_event(type="Freeze", not_before_in_seconds=600)
    wait_until(lambda: approved_ids(live) == [freeze["EventId"]])
    (tmp_path / "block-prepare-Reboot").touch()
    reboot = live.add_event(type="Reboot", not_before_in_seconds=600)
    wait_until((tmp_path / "pid-prepare-Reboot").exists)
    # The Freeze ends while the Reboot's drain runs: its recover hooks must wait.
    live.control("POST", f"events/{freeze['EventId']}/complete")
    wait_until(lambda: state_of(agent, freeze["EventId"]) == RECOVERING)
    (tmp_path / "block-prepare-Reboot").unlink()
    wait_until(lambda: approved_ids(live) == [freeze["EventId"], reboot["EventId"]])
    # Approved, not over: still no recover.
    assert not [line for line in calls(tmp_path) if " recover " in line]
    live.control("POST", f"events/{reboot['EventId']}/complete")
    wait_until(lambda: state_of(agent, freeze["EventId"]) == DONE)
    wait_until(lambda: state_of(agent, reboot["EventId"]) == DONE)
    recover = [line for line in calls(tmp_path) if " recover " in line]
    # One after another, never side by side.
    assert [line.split()[0] for line in recover] == ["start", "end", "start", "end"]
    assert recover[0].split()[3] == recover[1].split()[3]


def test_prepare_hooks_of_two_events_may_run_at_once(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(start_agent(tmp_path, live.url))
    (tmp_path / "block-prepare-Reboot").touch()
    live.add_event(type="Reboot", not_before_in_seconds=600)
    wait_until((tmp_path / "pid-prepare-Reboot").exists)
    preempt = live.add_event(type="Preempt", not_before_in_seconds=30)
    # The Preempt's 30 s notice is met while the long Reboot drain still runs.
    wait_until(lambda: approved_ids(live) == [preempt["EventId"]])
    (tmp_path / "block-prepare-Reboot").unlink()


def test_an_event_with_no_not_before_is_approved(
    standin: StandIn, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    standin.serve({"DocumentIncarnation": 3, "Events": [wire_event("E-NB", NotBefore="")]})
    agents.append(agent := start_agent(tmp_path, standin.url))
    wait_until(lambda: standin.approved_ids() == ["E-NB"])
    wait_until(lambda: state_of(agent, "E-NB") == "approved")


def test_a_failing_post_is_not_tried_again_once_the_event_is_shared(
    standin: StandIn, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    standin.post_status = 503  # IMDS fails the POST: the agent tries again...
    standin.serve({"DocumentIncarnation": 3, "Events": [wire_event("E-2", NotBefore="")]})
    agents.append(agent := start_agent(tmp_path, standin.url))
    wait_until(lambda: len(standin.posts) >= 1)
    # ...and meanwhile the event comes to name another VM: approving would release it.
    shared = wire_event("E-2", NotBefore="", Resources=["web_4", "web_5"])
    standin.serve({"DocumentIncarnation": 4, "Events": [shared]})
    wait_until(lambda: state_of(agent, "E-2") == WAITING, timeout=30)
    tries = len(standin.posts)
    standin.post_status = 200
    record = agent.store.get("E-2")
    assert record is not None and record.decision is not None
    assert "shared with web_5" in record.decision
    assert [a.outcome for a in agent.store.approvals("E-2")] == ["withdrawn"]
    unchanged = {"outcome": "unchanged"}
    polls = sample(agent, "scheduled_events_agent_polls_total", unchanged) or 0
    wait_until(
        lambda: (sample(agent, "scheduled_events_agent_polls_total", unchanged) or 0) > polls + 3
    )
    assert len(standin.posts) == tries  # no POST after the decision went to "no"


def test_an_event_missing_from_the_newest_document_is_not_approved(
    standin: StandIn, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    standin.serve({"DocumentIncarnation": 3, "Events": [wire_event("E-3")]})
    (tmp_path / "block-prepare-Reboot").touch()
    agents.append(agent := start_agent(tmp_path, standin.url, events={"gone_grace_seconds": 30}))
    wait_until((tmp_path / "pid-prepare-Reboot").exists)
    # While the drain runs, the document holds only an entry that cannot be read.
    unreadable = {**wire_event("E-3"), "EventId": None}
    standin.serve({"DocumentIncarnation": 4, "Events": [unreadable]})
    wait_until(lambda: sample(agent, "scheduled_events_agent_unreadable_events_total") == 1)
    (tmp_path / "block-prepare-Reboot").unlink()
    wait_until(lambda: "end prepare Reboot E-3" in calls(tmp_path))
    wait_until(lambda: any(run.outcome == "succeeded" for run in agent.store.hook_runs("E-3")))
    polls = sample(agent, "scheduled_events_agent_polls_total", {"outcome": "unchanged"}) or 0
    wait_until(
        lambda: (
            (sample(agent, "scheduled_events_agent_polls_total", {"outcome": "unchanged"}) or 0)
            > polls + 3
        )
    )
    assert standin.posts == []
    assert state_of(agent, "E-3") == "preparing"


# 3. One bad field never blinds the agent --------------------------------------------------------


def test_a_malformed_sibling_never_hides_this_vms_event(
    standin: StandIn, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    standin.serve(
        {
            "DocumentIncarnation": 3,
            "Events": [
                wire_event("OTHER", Resources=["web_5"], DurationInSeconds=5.0),
                wire_event("BROKEN", Resources=["web_6"], NotBefore="soon"),
                wire_event("MINE"),
            ],
        }
    )
    with capture_logs() as logs:
        agents.append(agent := start_agent(tmp_path, standin.url))
        wait_until(lambda: standin.approved_ids() == ["MINE"])
        standin.serve(
            {
                "DocumentIncarnation": 4,
                "Events": [
                    wire_event("OTHER", Resources=["web_5"], DurationInSeconds=5.0),
                    wire_event("BROKEN", Resources=["web_6"], NotBefore="soon"),
                    wire_event("MINE", EventStatus="Started", NotBefore=""),
                ],
            }
        )
        wait_until(
            lambda: (r := agent.store.get("MINE")) is not None and r.event.status == "Started"
        )
    unreadable = [log for log in logs if log["event"] == "document.unreadable"]
    assert [(log["path"], log["event_id"]) for log in unreadable] == [
        ("$.Events[1].NotBefore", "BROKEN")
    ]  # logged once, though two documents held it
    assert sample(agent, "scheduled_events_agent_unreadable_events_total") == 1
    assert state_of(agent, "OTHER") == IGNORED


def test_an_unreadable_event_that_names_this_vm_is_a_failed_prepare(
    standin: StandIn, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    standin.serve({"DocumentIncarnation": 3, "Events": [wire_event("BAD", EventType=["Reboot"])]})
    agents.append(agent := start_agent(tmp_path, standin.url))
    wait_until(lambda: sample(agent, "scheduled_events_agent_pending_events_prepare_failed") == 1)
    assert standin.approved_ids() == []
    assert agent.store.get("BAD") is None


@pytest.mark.parametrize("incarnation", [2**63, int("9" * 400)], ids=["2^63", "400 digits"])
def test_an_out_of_range_incarnation_is_a_poll_failure_not_a_crash(
    standin: StandIn, tmp_path: Path, incarnation: int
) -> None:
    standin.serve(b'{"DocumentIncarnation": %d, "Events": []}' % incarnation)
    agent = build_agent(tmp_path, standin.url)
    try:
        with capture_logs() as logs:
            assert agent.daemon.run_once() == 1
    finally:
        agent.close()
    (failure,) = [log for log in logs if log["event"] == "imds.poll_failed"]
    assert "$.DocumentIncarnation" in failure["reason"]


# 4. Hook configuration fails closed -------------------------------------------------------------


def assert_refused_without_approval(agent: RunningAgent, live: Emulator, fix: str) -> None:
    """A Reboot comes: its prepare phase is refused, saying ``fix``, and nothing is approved."""
    event_id = live.add_event(type="Reboot", not_before_in_seconds=600)["EventId"]
    wait_until(lambda: state_of(agent, event_id) == WAITING)
    assert approved_ids(live) == []
    (run,) = agent.store.hook_runs(event_id, "prepare")
    assert run.outcome == "refused"
    assert run.output_tail is not None and fix in run.output_tail


def test_a_missing_prepare_dir_holds_back_the_approval(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    missing = tmp_path / "prepare.typo"
    agents.append(agent := start_agent(tmp_path, live.url, hooks={"prepare_dir": str(missing)}))
    assert_refused_without_approval(agent, live, "does not exist")


def test_a_prepare_hook_without_its_execute_bit_holds_back_the_approval(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start_agent(tmp_path, live.url))
    (tmp_path / "prepare.d" / "10-record").chmod(0o644)
    assert_refused_without_approval(agent, live, "chmod +x")


def test_an_empty_prepare_dir_still_means_no_hooks(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(start_agent(tmp_path, live.url))
    (tmp_path / "prepare.d" / "10-record").unlink()
    event = live.add_event(type="Reboot", not_before_in_seconds=600)
    wait_until(lambda: approved_ids(live) == [event["EventId"]])


# 5. Never two of anything -----------------------------------------------------------------------


def test_an_unexpected_error_in_a_worker_is_logged_counted_and_taken_up_again(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent], monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.daemon as daemon_module

    real = daemon_module.deadline_for
    failures = iter([True])

    def deadline_once_broken(*args: Any, **kwargs: Any) -> datetime:
        if next(failures, False):
            raise RuntimeError("a bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(daemon_module, "deadline_for", deadline_once_broken)
    with capture_logs() as logs:
        agents.append(agent := start_agent(tmp_path, live.url))
        event = live.add_event(type="Reboot", not_before_in_seconds=600)
        wait_until(lambda: any(log["event"] == "event.work_failed" for log in logs))
        assert approved_ids(live) == []
        live.add_event(type="Freeze", not_before_in_seconds=600)  # a new document
        wait_until(lambda: event["EventId"] in approved_ids(live))
    (failed,) = [log for log in logs if log["event"] == "event.work_failed"]
    assert isinstance(failed["exc_info"], RuntimeError)
    assert sample(agent, "scheduled_events_agent_event_work_failures_total") == 1


def test_run_once_exits_1_when_the_approval_post_failed(standin: StandIn, tmp_path: Path) -> None:
    standin.serve({"DocumentIncarnation": 3, "Events": [wire_event("E1")]})
    standin.post_status = 400
    agent = build_agent(tmp_path, standin.url)
    try:
        assert agent.daemon.run_once() == 1
    finally:
        agent.close()
    assert standin.approved_ids() == ["E1"]


def test_a_hammered_event_never_has_two_workers() -> None:
    import sys

    from agent.workers import Workers

    stop = threading.Event()
    lock = threading.Lock()
    inside: dict[str, int] = {}
    overlaps = []
    steps = []

    def step(key: str) -> bool:
        with lock:
            inside[key] = inside.get(key, 0) + 1
            if inside[key] > 1:
                overlaps.append(key)
            steps.append(key)
        for _ in range(50):
            pass
        with lock:
            inside[key] -= 1
        return False

    errors: list[BaseException] = []
    workers = Workers(step, stop=stop, on_error=lambda key, error: errors.append(error))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:

        def hammer() -> None:
            for _ in range(2000):
                workers.wake("e1")

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        workers.join()
    finally:
        sys.setswitchinterval(interval)
    assert overlaps == []
    assert errors == []
    assert steps  # it did work
