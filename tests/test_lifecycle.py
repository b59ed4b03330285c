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
    NO_DEADLINE_APPROVAL_SECONDS,
    PREPARING,
    RECOVERING,
    TRANSITIONS,
    WAITING,
    Approve,
    Move,
    Nothing,
    PhaseHooks,
    Policy,
    RunHook,
    Situation,
    Wait,
    decide_approval,
    next_step,
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


# next_step: what now for one event, for every case the agent once got wrong -----------------

DOCUMENTED = ("Freeze", "Reboot", "Redeploy", "Preempt", "Terminate")
NO_HOOKS = PhaseHooks((), {})


def hooks(*names: str, **outcomes: str | None) -> PhaseHooks:
    return PhaseHooks(names, {name.replace("_", "-"): value for name, value in outcomes.items()})


def situation(**fields: Any) -> Situation:
    values: dict[str, Any] = {
        "state": PREPARING,
        "event": event(),
        "present": True,
        "readable": True,
        "self_service": False,
        "prepare": hooks("10-drain"),
        "recover": hooks("10-undrain"),
        "approval_may_have_landed": False,
        "others_in_flight": False,
        "recover_running": False,
        "now": NOW,
    }
    values.update(fields)
    return Situation(**values)


POLICY = Policy(vm_name="web_4", types=DOCUMENTED)
DRAINED = hooks("10-drain", **{"10_drain": "succeeded"})
FIFTEEN_MINUTES = 15 * 60.0
SKIP_LEAVE = Policy(vm_name="web_4", types=DOCUMENTED, skip_freeze_up_to_seconds=10)
SKIP_APPROVE = Policy(
    vm_name="web_4", types=DOCUMENTED, skip_freeze_up_to_seconds=10, skipped_events="approve"
)
SKIPPED = "a Freeze of 5 s (hooks.skip_freeze_up_to_seconds is 10): hooks skipped"

CASES: list[tuple[str, dict[str, Any], Policy, Any]] = [
    # Preparing: one hook at a time, then the decision.
    ("a new event runs its first hook", {}, POLICY, RunHook("prepare", "10-drain")),
    (
        "a hook cut short by a crash runs again",
        {"prepare": hooks("10-drain", **{"10_drain": None})},
        POLICY,
        RunHook("prepare", "10-drain"),
    ),
    (
        "prepared: approve",
        {"prepare": DRAINED},
        POLICY,
        Move("prepared_approve", "prepare hooks succeeded"),
    ),
    (
        "no hooks at all counts as prepared",
        {"prepare": NO_HOOKS},
        POLICY,
        Move("prepared_approve", "prepare hooks succeeded"),
    ),
    (
        "a failed hook holds the approval back",
        {"prepare": hooks("10-drain", "20-stop", **{"10_drain": "refused"})},
        POLICY,
        Move(
            "prepared_no_approval",
            "prepare hooks failed (approval.mode is on-success)",
            "skipped",
            "prepare_failed",
        ),
    ),
    (
        "a prepare hook waits for another event's recover hook",
        {"recover_running": True},
        POLICY,
        Wait("a recover hook of another event is running"),
    ),
    # Relevance is made again from the newest form.
    (
        "an ignored event that comes to name this VM is prepared",
        {"state": IGNORED},
        POLICY,
        Move("became_relevant", "names this VM"),
    ),
    (
        "an ignored event whose type is now enabled is prepared",
        {"state": IGNORED, "event": event(EventType="Reboot")},
        Policy(vm_name="web_4", types=("Reboot",)),
        Move("became_relevant", "names this VM"),
    ),
    (
        "an event that stops naming this VM before any hook is ignored",
        {"event": event(Resources=["web_5"]), "prepare": hooks("10-drain")},
        POLICY,
        Move("irrelevant_before_hooks", "for other VMs (web_5)"),
    ),
    (
        "a prepared event that stops naming this VM is recovered",
        {"state": WAITING, "event": event(Resources=["web_5"]), "prepare": DRAINED},
        POLICY,
        Move("no_longer_relevant", "for other VMs (web_5)"),
    ),
    (
        "a type disabled meanwhile: recovered",
        {"state": APPROVED, "event": event(EventType="Freeze"), "prepare": DRAINED},
        Policy(vm_name="web_4", types=("Reboot",)),
        Move("no_longer_relevant", "type Freeze is not in events.types"),
    ),
    # Approving: the whole decision again, from the newest document, before every POST.
    (
        "approving: approve within the time to NotBefore",
        {"state": APPROVING, "prepare": DRAINED},
        POLICY,
        Approve(FIFTEEN_MINUTES, "prepare hooks succeeded"),
    ),
    (
        "approving, the event grew to name another VM: no POST",
        {"state": APPROVING, "prepare": DRAINED, "event": event(Resources=["web_4", "web_5"])},
        POLICY,
        Move(
            "approval_abandoned",
            "shared with web_5: approving would release them too (approval.shared_events is skip)",
            "skipped",
            "shared",
        ),
    ),
    (
        "approving after a restart with mode never: no POST",
        {"state": APPROVING, "prepare": DRAINED},
        Policy(vm_name="web_4", types=DOCUMENTED, mode="never"),
        Move("approval_abandoned", "approval.mode is never", "skipped", "mode_never"),
    ),
    (
        "approving, NotBefore moved nearer: a smaller budget",
        {
            "state": APPROVING,
            "prepare": DRAINED,
            "event": event(
                NotBefore=(NOW + timedelta(seconds=40)).strftime("%a, %d %b %Y %H:%M:%S GMT")
            ),
        },
        POLICY,
        Approve(40.0, "prepare hooks succeeded"),
    ),
    (
        'approving with NotBefore "": approved, with a bounded budget',
        {"state": APPROVING, "prepare": DRAINED, "event": event(NotBefore="")},
        POLICY,
        Approve(NO_DEADLINE_APPROVAL_SECONDS, "prepare hooks succeeded"),
    ),
    (
        "approving, NotBefore passed: no POST",
        {"state": APPROVING, "prepare": DRAINED, "now": NOW + timedelta(hours=1)},
        POLICY,
        Move(
            "approval_abandoned",
            "NotBefore has passed: Azure starts it anyway",
            "skipped",
            "not_before_passed",
        ),
    ),
    (
        "approving, a POST may have landed before a restart: never again",
        {"state": APPROVING, "prepare": DRAINED, "approval_may_have_landed": True},
        POLICY,
        Move("approval_abandoned", "approval sent before a restart", "skipped", "already_sent"),
    ),
    (
        "approving in a dry run: nothing is posted",
        {"state": APPROVING, "prepare": DRAINED},
        Policy(vm_name="web_4", types=DOCUMENTED, dry_run=True),
        Move("approval_abandoned", "dry run", "skipped", "dry_run"),
    ),
    # Comings and goings.
    (
        "gone before any hook ran",
        {"present": False, "prepare": hooks("10-drain")},
        POLICY,
        Move("gone_before_hooks", "left before any hook ran"),
    ),
    (
        "gone in the middle of preparing: recovered",
        {"present": False, "prepare": hooks("10-drain", "20-stop", **{"10_drain": "succeeded"})},
        POLICY,
        Move("gone", "left the document"),
    ),
    (
        "gone while approving: no POST",
        {"state": APPROVING, "present": False, "prepare": DRAINED},
        POLICY,
        Move("approval_abandoned", "event left the document", "skipped", "event_left"),
    ),
    (
        "an ignored event that left is done",
        {"state": IGNORED, "present": False},
        POLICY,
        Move("gone", "left the document"),
    ),
    (
        "unreadable in the newest document: wait, never approve",
        {"state": APPROVING, "prepare": DRAINED, "readable": False},
        POLICY,
        Wait("the newest document holds this event in a form that cannot be read"),
    ),
    (
        "approved: nothing until it leaves",
        {"state": APPROVED, "prepare": DRAINED},
        POLICY,
        Nothing(),
    ),
    # Recovering: never beside another event in flight.
    (
        "recovering while another event is in flight: wait",
        {"state": RECOVERING, "others_in_flight": True},
        POLICY,
        Wait("another event of this VM is being prepared, approved or awaited"),
    ),
    (
        "recovering: run the recover hook",
        {"state": RECOVERING},
        POLICY,
        RunHook("recover", "10-undrain"),
    ),
    (
        "recovered",
        {"state": RECOVERING, "recover": hooks("10-undrain", **{"10_undrain": "succeeded"})},
        POLICY,
        Move("recovered", "recover hooks succeeded"),
    ),
    (
        "a recover hook failed: done all the same",
        {"state": RECOVERING, "recover": hooks("10-undrain", **{"10_undrain": "failed"})},
        POLICY,
        Move("recovered", "recover hooks failed"),
    ),
    # Self-service maintenance: its own thread prepares it; it is never approved here.
    ("self-service while preparing", {"self_service": True}, POLICY, Nothing()),
    (
        "self-service over before any hook",
        {"self_service": True, "present": False},
        POLICY,
        Move("gone_before_hooks", "left before any hook ran"),
    ),
    ("done is done", {"state": DONE}, POLICY, Nothing()),
    # A short Freeze: no hooks, then what hooks.skipped_events says.
    (
        "a short Freeze is left to Azure without hooks",
        {"event": event(EventType="Freeze", DurationInSeconds=5)},
        SKIP_LEAVE,
        Move(
            "prepared_no_approval",
            f"{SKIPPED}; left to Azure (hooks.skipped_events is leave)",
            "skipped",
            "short_freeze",
        ),
    ),
    (
        "a short Freeze is approved at once without hooks",
        {"event": event(EventType="Freeze", DurationInSeconds=5)},
        SKIP_APPROVE,
        Move("prepared_approve", f"{SKIPPED}; approved at once (hooks.skipped_events is approve)"),
    ),
    (
        "a skipped Freeze is approved again from the newest document",
        {"state": APPROVING, "event": event(EventType="Freeze", DurationInSeconds=5)},
        SKIP_APPROVE,
        Approve(FIFTEEN_MINUTES, f"{SKIPPED}; approved at once (hooks.skipped_events is approve)"),
    ),
    (
        "a Freeze of exactly the limit is short",
        {"event": event(EventType="Freeze", DurationInSeconds=10)},
        SKIP_LEAVE,
        Move(
            "prepared_no_approval",
            "a Freeze of 10 s (hooks.skip_freeze_up_to_seconds is 10): hooks skipped;"
            " left to Azure (hooks.skipped_events is leave)",
            "skipped",
            "short_freeze",
        ),
    ),
    (
        "a Freeze longer than the limit gets its hooks",
        {"event": event(EventType="Freeze", DurationInSeconds=11)},
        SKIP_APPROVE,
        RunHook("prepare", "10-drain"),
    ),
    (
        "a Freeze of unknown length gets its hooks",
        {"event": event(EventType="Freeze", DurationInSeconds=-1)},
        SKIP_APPROVE,
        RunHook("prepare", "10-drain"),
    ),
    (
        "a short Reboot is no Freeze: it gets its hooks",
        {"event": event(EventType="Reboot", DurationInSeconds=5)},
        SKIP_APPROVE,
        RunHook("prepare", "10-drain"),
    ),
    (
        "without the setting a short Freeze gets its hooks",
        {"event": event(EventType="Freeze", DurationInSeconds=5)},
        POLICY,
        RunHook("prepare", "10-drain"),
    ),
    (
        "a skipped Freeze still is not approved when shared",
        {"event": event(EventType="Freeze", DurationInSeconds=5, Resources=["web_4", "web_5"])},
        SKIP_APPROVE,
        Move(
            "prepared_no_approval",
            "shared with web_5: approving would release them too (approval.shared_events is skip)",
            "skipped",
            "shared",
        ),
    ),
    (
        "a skipped Freeze that grew longer before its approval goes back for its hooks",
        {"state": APPROVING, "event": event(EventType="Freeze", DurationInSeconds=30)},
        SKIP_APPROVE,
        Move("hooks_needed", "no longer a short Freeze: its prepare hooks run"),
    ),
    (
        "a Freeze left to Azure that grew longer goes back for its hooks",
        {"state": WAITING, "event": event(EventType="Freeze", DurationInSeconds=30)},
        SKIP_LEAVE,
        Move("hooks_needed", "no longer a short Freeze: its prepare hooks run"),
    ),
    (
        "a skipped Freeze already approved stays as it is",
        {
            "state": APPROVED,
            "event": event(EventType="Freeze", DurationInSeconds=30),
            "approval_may_have_landed": True,
        },
        SKIP_APPROVE,
        Nothing(),
    ),
    (
        "a waiting event whose hooks ran does not go back",
        {"state": WAITING, "prepare": DRAINED},
        POLICY,
        Nothing(),
    ),
    (
        "a waiting event of a phase without hooks does not go back",
        {"state": WAITING, "prepare": NO_HOOKS},
        POLICY,
        Nothing(),
    ),
    (
        "a skipped Freeze gets no recover hooks either",
        {"state": RECOVERING, "event": event(EventType="Freeze", DurationInSeconds=5)},
        SKIP_LEAVE,
        Move("recovered", f"recover hooks skipped: {SKIPPED}"),
    ),
    (
        "a skipped Freeze that Azure lengthened later still gets no recover hooks",
        {
            "state": RECOVERING,
            "event": event(EventType="Freeze", DurationInSeconds=30),
            "skipped_before": True,
        },
        SKIP_LEAVE,
        Move(
            "recovered", "recover hooks skipped: its prepare hooks were skipped as a short Freeze"
        ),
    ),
    (
        "a Freeze whose prepare hooks ran gets its recover hooks",
        {
            "state": RECOVERING,
            "event": event(EventType="Freeze", DurationInSeconds=5),
            "prepare": DRAINED,
        },
        SKIP_LEAVE,
        RunHook("recover", "10-undrain"),
    ),
]


@pytest.mark.parametrize(
    ("fields", "policy", "expected"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_next_step(fields: dict[str, Any], policy: Policy, expected: Any) -> None:
    assert next_step(situation(**fields), policy) == expected


def test_every_step_next_step_returns_is_a_legal_move() -> None:
    for _, fields, policy, _expected in CASES:
        step = next_step(situation(**fields), policy)
        if isinstance(step, Move):
            transition("E1", fields.get("state", PREPARING), step.trigger)
