"""Which hooks run for which event: hooks.event_types, and the short Freeze that gets none
(hooks.skip_freeze_up_to_seconds, hooks.skipped_events). The agent against the emulator, with
real hook scripts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.lifecycle import DONE, WAITING
from tests.agent_harness import RunningAgent, start_agent, state_of
from tests.conftest import Emulator, approved_ids, wait_until

HOOK = """#!/bin/sh
echo "$SCHEDULED_EVENT_PHASE {name} $SCHEDULED_EVENT_TYPE" >> "{log}"
"""
STOPS_AND_DRAINS = ["Reboot", "Redeploy", "Preempt", "Terminate"]


@pytest.fixture
def agents() -> Iterator[list[RunningAgent]]:
    running: list[RunningAgent] = []
    yield running
    for agent in running:
        agent.close()


def write_hooks(directory: Path) -> dict[str, Any]:
    """10-notify and 40-stop-service in prepare.d, 60-start-service and 99-notify in
    recover.d, each recording its runs in runs.log."""
    for phase, names in (
        ("prepare", ["10-notify", "40-stop-service"]),
        ("recover", ["60-start-service", "99-notify"]),
    ):
        hooks = directory / f"{phase}.d"
        hooks.mkdir()
        for name in names:
            path = hooks / name
            path.write_text(HOOK.format(name=name, log=directory / "runs.log"))
            path.chmod(0o755)
    return {
        "prepare_dir": str(directory / "prepare.d"),
        "recover_dir": str(directory / "recover.d"),
    }


def runs(directory: Path) -> list[str]:
    log = directory / "runs.log"
    return log.read_text().splitlines() if log.exists() else []


def start(directory: Path, live: Emulator, **hooks: Any) -> RunningAgent:
    return start_agent(
        directory, live.url, recording_hooks=False, hooks={**write_hooks(directory), **hooks}
    )


def test_hooks_run_only_for_the_event_types_they_are_configured_for(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    only = {"40-stop-service": STOPS_AND_DRAINS, "60-start-service": STOPS_AND_DRAINS}
    agents.append(agent := start(tmp_path, live, event_types=only))
    freeze = live.add_event(type="Freeze", duration_seconds=30, started_for_seconds=0.3)
    wait_until(lambda: state_of(agent, freeze["EventId"]) == DONE, timeout=30)
    assert approved_ids(live) == [freeze["EventId"]]
    assert runs(tmp_path) == ["prepare 10-notify Freeze", "recover 99-notify Freeze"]
    reboot = live.add_event(type="Reboot", started_for_seconds=0.3)
    wait_until(lambda: state_of(agent, reboot["EventId"]) == DONE, timeout=30)
    assert runs(tmp_path)[2:] == [
        "prepare 10-notify Reboot",
        "prepare 40-stop-service Reboot",
        "recover 60-start-service Reboot",
        "recover 99-notify Reboot",
    ]


def test_a_short_freeze_skips_every_hook_and_is_approved_when_so_configured(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    with capture_logs() as logs:
        agents.append(
            agent := start(tmp_path, live, skip_freeze_up_to_seconds=10, skipped_events="approve")
        )
        freeze = live.add_event(type="Freeze", duration_seconds=5, started_for_seconds=0.3)
        wait_until(lambda: state_of(agent, freeze["EventId"]) == DONE, timeout=30)
    assert approved_ids(live) == [freeze["EventId"]]
    assert runs(tmp_path) == []
    (decision,) = [entry for entry in logs if entry["event"] == "event.approval_decision"]
    assert decision["approve"] is True
    assert decision["reason"] == (
        "a Freeze of 5 s (hooks.skip_freeze_up_to_seconds is 10): hooks skipped;"
        " approved at once (hooks.skipped_events is approve)"
    )
    (recovered,) = [entry for entry in logs if entry["event"] == "event.recovered"]
    assert recovered["reason"].startswith("recover hooks skipped: a Freeze of 5 s")


def test_a_short_freeze_left_to_azure_gets_no_approval_and_no_hooks(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    with capture_logs() as logs:
        agents.append(agent := start(tmp_path, live, skip_freeze_up_to_seconds=10))
        freeze = live.add_event(type="Freeze", duration_seconds=5, not_before_in_seconds=120)
        wait_until(lambda: state_of(agent, freeze["EventId"]) == WAITING, timeout=30)
        live.control("POST", f"events/{freeze['EventId']}/complete")
        wait_until(lambda: state_of(agent, freeze["EventId"]) == DONE, timeout=30)
    assert approved_ids(live) == []
    assert runs(tmp_path) == []
    (decision,) = [entry for entry in logs if entry["event"] == "event.approval_decision"]
    assert decision["approve"] is False
    assert decision["reason"].endswith("left to Azure (hooks.skipped_events is leave)")


def test_a_skipped_freeze_that_grows_longer_gets_its_hooks(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(agent := start(tmp_path, live, skip_freeze_up_to_seconds=10))
    freeze = live.add_event(type="Freeze", duration_seconds=5, not_before_in_seconds=120)
    wait_until(lambda: state_of(agent, freeze["EventId"]) == WAITING, timeout=30)
    live.control("PATCH", f"events/{freeze['EventId']}", {"duration_seconds": 30})
    wait_until(lambda: approved_ids(live) == [freeze["EventId"]], timeout=30)
    assert runs(tmp_path) == ["prepare 10-notify Freeze", "prepare 40-stop-service Freeze"]


def test_a_skipped_freeze_changed_after_its_approval_gets_no_recover_hooks(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agents.append(
        agent := start(tmp_path, live, skip_freeze_up_to_seconds=10, skipped_events="approve")
    )
    freeze = live.add_event(type="Freeze", duration_seconds=5, not_before_in_seconds=120)
    wait_until(lambda: approved_ids(live) == [freeze["EventId"]], timeout=30)
    live.control("PATCH", f"events/{freeze['EventId']}", {"duration_seconds": 30})
    live.control("POST", f"events/{freeze['EventId']}/complete")
    wait_until(lambda: state_of(agent, freeze["EventId"]) == DONE, timeout=30)
    assert runs(tmp_path) == []
