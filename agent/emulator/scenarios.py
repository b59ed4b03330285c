"""Scenarios: timelines of control actions, named or read from YAML, replayed against a World.

A timeline is a list of steps ``{"at": SECONDS, ACTION: ARGUMENT}``: ``add`` takes a control-API
event body (plus an optional ``ref`` that later steps use to name the event), and ``start``,
``complete``, ``cancel`` and ``co-tenant-approve`` take a ref. ``"$vm"`` in ``resources`` stands
for the emulator's VM name. ``time_scale`` divides every duration (``at``,
``not_before_in_seconds``, ``started_for_seconds``) so that minutes run in seconds.

Steps are applied lazily, when a request arrives after they fall due, like every other change
of the World, so a scenario never lags behind the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from agent.emulator.world import ControlError, World

_ACTIONS = ("add", "start", "complete", "cancel", "co-tenant-approve")
_SCALED = ("not_before_in_seconds", "started_for_seconds")

MAINTENANCE = "Host server is undergoing maintenance."
NAMED: dict[str, list[dict[str, Any]]] = {
    "freeze": [
        {
            "at": 0,
            "add": {
                "ref": "e",
                "type": "Freeze",
                "not_before_in_seconds": 900,
                "duration_seconds": 5,
                "started_for_seconds": 10,
                "description": MAINTENANCE,
            },
        },
    ],
    "reboot": [
        {
            "at": 0,
            "add": {
                "ref": "e",
                "type": "Reboot",
                "not_before_in_seconds": 900,
                "started_for_seconds": 300,
                "description": MAINTENANCE,
            },
        },
    ],
    "redeploy": [
        {
            "at": 0,
            "add": {
                "ref": "e",
                "type": "Redeploy",
                "not_before_in_seconds": 600,
                "started_for_seconds": 600,
                "description": MAINTENANCE,
            },
        },
    ],
    "preempt": [
        {
            "at": 0,
            "add": {
                "ref": "e",
                "type": "Preempt",
                "not_before_in_seconds": 30,
                "started_for_seconds": 120,
                "description": "Spot eviction.",
            },
        },
    ],
    "terminate": [
        {
            "at": 0,
            "add": {
                "ref": "e",
                "type": "Terminate",
                "not_before_in_seconds": 300,
                "started_for_seconds": 120,
                "description": "Scale set instance is being deleted.",
            },
        },
    ],
    "user-reboot": [
        {
            "at": 0,
            "add": {
                "ref": "e",
                "type": "Reboot",
                "source": "User",
                "not_before_in_seconds": 900,
                "started_for_seconds": 120,
                "description": "Restart requested by the owner.",
            },
        },
    ],
    "cancelled": [
        {
            "at": 0,
            "add": {
                "ref": "e",
                "type": "Redeploy",
                "not_before_in_seconds": 600,
                "description": MAINTENANCE,
            },
        },
        {"at": 300, "cancel": "e"},
    ],
    "hardware-failure": [
        {
            "at": 0,
            "add": {
                "ref": "e",
                "type": "Reboot",
                "status": "Started",
                "started_for_seconds": 600,
                "description": "Host hardware failed; the VM is being recovered.",
            },
        },
    ],
    "availability-set": [
        {
            "at": 0,
            "add": {
                "ref": "other",
                "type": "Reboot",
                "resources": ["web_5"],
                "not_before_in_seconds": 900,
                "started_for_seconds": 300,
                "description": MAINTENANCE,
            },
        },
        {
            "at": 0,
            "add": {
                "ref": "own",
                "type": "Reboot",
                "resources": ["$vm"],
                "not_before_in_seconds": 900,
                "started_for_seconds": 300,
                "description": MAINTENANCE,
            },
        },
        {
            "at": 60,
            "add": {
                "ref": "shared",
                "type": "Redeploy",
                "resources": ["$vm", "web_6"],
                "not_before_in_seconds": 600,
                "started_for_seconds": 300,
                "description": MAINTENANCE,
            },
        },
    ],
}


class ScenarioError(ValueError):
    """A scenario that cannot be loaded; the message names the step and the problem."""


@dataclass
class Scenario:
    """A timeline started at ``started_at``; ``apply_due`` is the World's ``on_advance``."""

    name: str
    steps: list[dict[str, Any]]
    time_scale: float = 1.0
    started_at: datetime | None = None
    _next: int = 0
    _ids: dict[str, str] = field(default_factory=dict)

    def attach(self, world: World) -> None:
        with world.lock:
            self.started_at = world.now()
            world.on_advance = self.apply_due

    def apply_due(self, world: World, now: datetime) -> None:
        if self.started_at is None:
            return
        elapsed = (now - self.started_at).total_seconds()
        while self._next < len(self.steps):
            step = self.steps[self._next]
            if float(step["at"]) / self.time_scale > elapsed:
                return
            self._next += 1
            try:
                self._apply(world, step)
            except ControlError as error:
                if error.status != 404:
                    raise
                # The event already left by itself (its impact ended): nothing to do.

    def _apply(self, world: World, step: dict[str, Any]) -> None:
        action = next(name for name in _ACTIONS if name in step)
        if action == "add":
            spec = dict(step["add"])
            ref = spec.pop("ref", None)
            for key in _SCALED:
                if key in spec:
                    spec[key] = float(spec[key]) / self.time_scale
            spec["resources"] = [
                world.vm_name if name == "$vm" else name for name in spec.get("resources", ["$vm"])
            ]
            event = world.add(spec)
            if ref is not None:
                self._ids[str(ref)] = event.event_id
            return
        event_id = self._ids.get(str(step[action]), str(step[action]))
        if action == "start":
            world.start(event_id)
        elif action == "complete":
            world.complete(event_id)
        elif action == "cancel":
            world.cancel(event_id)
        else:
            world.co_tenant_approve(event_id)


def load(name_or_path: str, time_scale: float = 1.0) -> Scenario:
    """A named scenario, or a YAML file holding ``steps:`` (or just the list of steps)."""
    if time_scale <= 0:
        raise ScenarioError(f"time scale must be > 0, got {time_scale}")
    if name_or_path in NAMED:
        steps = [dict(step) for step in NAMED[name_or_path]]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ScenarioError(
                f"scenario {name_or_path!r} is neither a file nor one of: {', '.join(NAMED)}"
            )
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as error:
            raise ScenarioError(f"scenario {path}: cannot read it: {error}") from None
        loaded = data.get("steps") if isinstance(data, dict) else data
        if not isinstance(loaded, list):
            raise ScenarioError(f"scenario {path}: expected a list of steps under 'steps'")
        steps = loaded
    _validate(name_or_path, steps)
    steps.sort(key=lambda step: float(step["at"]))
    scenario = Scenario(name=name_or_path, steps=steps, time_scale=time_scale)
    _rehearse(scenario)
    return scenario


def _rehearse(scenario: Scenario) -> None:
    """Add every event of the scenario to a scratch World, so bad event bodies fail at load."""
    scratch = World()
    rehearsal = Scenario(scenario.name, [dict(step) for step in scenario.steps if "add" in step])
    for index, step in enumerate(rehearsal.steps):
        try:
            rehearsal._apply(scratch, step)
        except ControlError as error:
            raise ScenarioError(
                f"scenario {scenario.name}: event {index + 1} ({step['add']}): {error.message}"
            ) from None


def _validate(name: str, steps: list[Any]) -> None:
    for index, step in enumerate(steps):
        where = f"scenario {name}: step {index + 1}"
        if not isinstance(step, dict):
            raise ScenarioError(f"{where}: expected a mapping")
        at = step.get("at")
        if isinstance(at, bool) or not isinstance(at, (int, float)) or at < 0:
            raise ScenarioError(f"{where}: 'at' must be a number of seconds >= 0")
        actions = [name for name in _ACTIONS if name in step]
        extra = set(step) - {"at", *_ACTIONS}
        if len(actions) != 1 or extra:
            raise ScenarioError(f"{where}: needs exactly one of {', '.join(_ACTIONS)}")
        argument = step[actions[0]]
        if actions[0] == "add" and not isinstance(argument, dict):
            raise ScenarioError(f"{where}: 'add' takes an event mapping")
        if actions[0] != "add" and not isinstance(argument, str):
            raise ScenarioError(f"{where}: '{actions[0]}' takes an event ref")
