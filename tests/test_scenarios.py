"""Scenarios: named and YAML timelines, replayed against the emulator at a time scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.emulator.scenarios import NAMED, ScenarioError, load
from agent.emulator.world import World
from tests.conftest import MovableClock


def play(name: str, time_scale: float = 1.0, vm_name: str = "web_4") -> tuple[World, MovableClock]:
    clock = MovableClock()
    world = World(vm_name=vm_name, now=clock.now)
    load(name, time_scale).attach(world)
    world.advance()
    return world, clock


def shown(world: World) -> list[dict[str, Any]]:
    world.advance()
    events: list[dict[str, Any]] = world.document("2020-07-01")["Events"]
    return events


@pytest.mark.parametrize(
    ("name", "event_type", "notice_seconds"),
    [
        ("freeze", "Freeze", 900),
        ("reboot", "Reboot", 900),
        ("redeploy", "Redeploy", 600),
        ("preempt", "Preempt", 30),
        ("terminate", "Terminate", 300),
        ("user-reboot", "Reboot", 900),
    ],
)
def test_each_named_scenario_runs_its_event_to_the_end(
    name: str, event_type: str, notice_seconds: int
) -> None:
    world, clock = play(name)
    (event,) = shown(world)
    assert (event["EventType"], event["EventStatus"]) == (event_type, "Scheduled")
    clock.move(notice_seconds - 1)
    assert shown(world)[0]["EventStatus"] == "Scheduled"
    clock.move(1)
    assert shown(world)[0]["EventStatus"] == "Started"
    clock.move(3600)
    assert shown(world) == []


def test_user_reboot_comes_from_the_user() -> None:
    world, _ = play("user-reboot")
    assert shown(world)[0]["EventSource"] == "User"


def test_cancelled_removes_the_event_before_it_starts() -> None:
    world, clock = play("cancelled")
    assert shown(world)[0]["EventStatus"] == "Scheduled"
    clock.move(300)
    assert shown(world) == []


def test_hardware_failure_arrives_already_started() -> None:
    world, clock = play("hardware-failure")
    (event,) = shown(world)
    assert (event["EventType"], event["EventStatus"], event["NotBefore"]) == (
        "Reboot",
        "Started",
        "",
    )
    clock.move(600)
    assert shown(world) == []


def test_availability_set_shows_the_events_of_every_member() -> None:
    world, clock = play("availability-set", vm_name="web_4")
    assert sorted(tuple(event["Resources"]) for event in shown(world)) == [("web_4",), ("web_5",)]
    clock.move(60)
    assert ("web_4", "web_6") in [tuple(event["Resources"]) for event in shown(world)]


def test_the_time_scale_divides_every_duration() -> None:
    world, clock = play("cancelled", time_scale=60)  # 10 min notice, cancelled at 5 min
    clock.move(4.9)
    assert len(shown(world)) == 1
    clock.move(0.1)
    assert shown(world) == []
    world, clock = play("preempt", time_scale=10)  # 30 s notice, 120 s started
    clock.move(3)
    assert shown(world)[0]["EventStatus"] == "Started"
    clock.move(12)
    assert shown(world) == []


def test_every_named_scenario_is_listed() -> None:
    assert set(NAMED) == {
        "freeze",
        "reboot",
        "redeploy",
        "preempt",
        "terminate",
        "user-reboot",
        "cancelled",
        "hardware-failure",
        "availability-set",
    }


def test_a_yaml_timeline_uses_refs_and_the_vm_placeholder(tmp_path: Path) -> None:
    timeline = tmp_path / "mine.yaml"
    timeline.write_text(
        "steps:\n"
        "  - at: 10\n"
        "    start: first\n"
        "  - at: 0\n"
        "    add: {ref: first, type: Reboot, resources: [$vm, db_1], event_id: abc}\n"
        "  - at: 20\n"
        "    complete: first\n"
    )
    world, clock = play(str(timeline), vm_name="app_2")
    (event,) = shown(world)
    assert (event["EventId"], event["Resources"]) == ("abc", ["app_2", "db_1"])
    clock.move(10)
    assert shown(world)[0]["EventStatus"] == "Started"
    clock.move(10)
    assert shown(world) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("steps: 5\n", "list of steps"),
        ("- at: -1\n  add: {type: Reboot}\n", "'at'"),
        ("- at: 0\n", "exactly one of"),
        ("- at: 0\n  add: {type: Reboot}\n  cancel: x\n", "exactly one of"),
        ("- at: 0\n  add: Reboot\n", "event mapping"),
        ("- at: 0\n  cancel: [x]\n", "event ref"),
        ("- at: 0\n  add: {type: Reboot, colour: red}\n", "colour"),
        (
            "- at: 0\n  add: {type: Reboot, event_id: a}\n"
            "- at: 1\n  add: {type: Reboot, event_id: A}\n",
            "already exists",
        ),
        ("steps: [\n", "cannot read"),
    ],
)
def test_a_bad_timeline_is_refused_with_the_reason(
    tmp_path: Path, content: str, message: str
) -> None:
    timeline = tmp_path / "bad.yaml"
    timeline.write_text(content)
    with pytest.raises(ScenarioError, match=message):
        load(str(timeline))


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ScenarioError, match="availability-set"):
        load("no-such-scenario")


def test_the_time_scale_must_be_positive() -> None:
    with pytest.raises(ScenarioError):
        load("reboot", time_scale=0)
