"""The lifecycle's transition table, the approval decision and next_step: pure, no I/O."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from agent.errors import IllegalTransition
from agent.events import ScheduledEvent, parse_document
from agent.lifecycle import (
    APPROVED,
    APPROVING,
    DONE,
    IGNORED,
    PREPARING,
    RECOVERING,
    TRANSITIONS,
    WAITING,
    decide_approval,
    relevance,
    transition,
)

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=timezone.utc)


def event(**fields: Any) -> ScheduledEvent:
    raw: dict[str, Any] = {
        "EventId": "E1",
        "EventStatus": "Scheduled",
        "EventType": "Reboot",
        "Resources": ["web_4"],
        "NotBefore": (NOW + timedelta(minutes=15)).strftime("%a, %d %b %Y %H:%M:%S GMT"),
    }
    raw.update(fields)
    return parse_document({"DocumentIncarnation": 1, "Events": [raw]}).events[0]


def decide(subject: ScheduledEvent, **options: Any) -> tuple[bool, str]:
    settings: dict[str, Any] = {
        "vm_name": "web_4",
        "mode": "on-success",
        "shared_events": "skip",
        "prepare_succeeded": True,
        "now": NOW,
    }
    settings.update(options)
    decision = decide_approval(subject, **settings)
    return decision.approve, decision.reason


def test_the_happy_path_through_the_table() -> None:
    state = transition("E1", None, "discovered")
    for trigger, expected in [
        ("prepared_approve", APPROVING),
        ("approval_succeeded", APPROVED),
        ("gone", RECOVERING),
        ("recovered", DONE),
    ]:
        state = transition("E1", state, trigger)
        assert state == expected
    assert state == DONE


def test_an_illegal_move_names_the_event_the_state_and_the_trigger() -> None:
    with pytest.raises(IllegalTransition) as raised:
        transition("E1", DONE, "prepared_approve")
    assert str(raised.value) == "event E1: no transition from state 'done' on 'prepared_approve'"
    with pytest.raises(IllegalTransition):
        transition("E1", APPROVED, "approval_succeeded")  # never approved twice


def test_done_is_final_and_every_state_but_done_can_end() -> None:
    assert not [key for key in TRANSITIONS if key[0] == DONE]
    for state in (PREPARING, APPROVING, APPROVED, WAITING, IGNORED):
        assert any(key[0] == state and key[1].startswith("gone") for key in TRANSITIONS), state


def test_relevance_filters_on_resources_and_types() -> None:
    assert relevance(event(), "web_4", ["Reboot"]).relevant
    assert not relevance(event(), "web_5", ["Reboot"]).relevant
    other_type = relevance(event(), "web_4", ["Freeze"])
    assert not other_type.relevant and "events.types" in other_type.reason


@pytest.mark.parametrize(
    ("subject", "options", "approve", "words"),
    [
        (event(), {}, True, "prepare hooks succeeded"),
        (event(), {"prepare_succeeded": False}, False, "prepare hooks failed"),
        (event(), {"prepare_succeeded": False, "mode": "always"}, True, "always"),
        (event(), {"mode": "never"}, False, "never"),
        (event(Resources=["web_4", "web_5"]), {}, False, "web_5"),
        (event(Resources=["web_4", "web_5"]), {"shared_events": "approve"}, True, "succeeded"),
        (event(Resources=["WEB_4"]), {}, True, "succeeded"),
        (event(EventStatus="Started", NotBefore=""), {}, False, "begun"),
        (event(), {"now": NOW + timedelta(minutes=16)}, False, "NotBefore has passed"),
    ],
)
def test_the_approval_decision_and_its_reason(
    subject: ScheduledEvent, options: dict[str, Any], approve: bool, words: str
) -> None:
    decision, reason = decide(subject, **options)
    assert decision is approve
    assert words in reason
