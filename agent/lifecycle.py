"""The per-event lifecycle and the decisions about it: pure functions of the document, the stored
states, the configuration and the time. The daemon only carries the decisions out.

The transition table below is the whole lifecycle; a move it does not list raises
IllegalTransition naming the event, its state and the trigger.

    (new) --discovered--------------> preparing --prepared_approve----> approving
    (new) --discovered_ignored------> ignored      |                      |  approval_succeeded
                                                   | prepared_no_approval |  approval_abandoned
                                                   v                      v
                                                 waiting <------------ approved
    preparing/approving/approved/waiting --gone or no_longer_relevant--> recovering
    recovering --recovered--> done
    preparing --gone_before_hooks--> done          ignored --gone--> done
    preparing --irrelevant_before_hooks--> ignored --became_relevant--> preparing
    approving/waiting --hooks_needed--> preparing  (a Freeze skipped as short grew longer)

``next_step`` is the whole of "what now for this event": given the stored record, the event's
form in the newest document, the hooks already run, the slot and the time, it returns one step.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Union

from agent.errors import IllegalTransition
from agent.events import SCHEDULED, ScheduledEvent

IGNORED = "ignored"
PREPARING = "preparing"
APPROVING = "approving"
APPROVED = "approved"
WAITING = "waiting"
RECOVERING = "recovering"
DONE = "done"

# States in which the event may still need work from us (hooks or an approval).
ACTIVE = frozenset({PREPARING, APPROVING, APPROVED, WAITING, RECOVERING})

TRANSITIONS: Mapping[tuple[str | None, str], str] = {
    (None, "discovered"): PREPARING,
    (None, "discovered_ignored"): IGNORED,
    (PREPARING, "prepared_approve"): APPROVING,
    (PREPARING, "prepared_no_approval"): WAITING,
    (APPROVING, "approval_succeeded"): APPROVED,
    (APPROVING, "approval_abandoned"): WAITING,
    (PREPARING, "gone"): RECOVERING,
    (PREPARING, "gone_before_hooks"): DONE,
    (APPROVING, "gone"): RECOVERING,
    (APPROVED, "gone"): RECOVERING,
    (WAITING, "gone"): RECOVERING,
    (RECOVERING, "recovered"): DONE,
    (IGNORED, "gone"): DONE,
    (IGNORED, "became_relevant"): PREPARING,
    (PREPARING, "irrelevant_before_hooks"): IGNORED,
    (PREPARING, "no_longer_relevant"): RECOVERING,
    (APPROVING, "no_longer_relevant"): RECOVERING,
    (APPROVED, "no_longer_relevant"): RECOVERING,
    (WAITING, "no_longer_relevant"): RECOVERING,
    (APPROVING, "hooks_needed"): PREPARING,
    (WAITING, "hooks_needed"): PREPARING,
}


def transition(event_id: str, state: str | None, trigger: str) -> str:
    """The state after ``trigger``; IllegalTransition if the table has no such move."""
    try:
        return TRANSITIONS[(state, trigger)]
    except KeyError:
        raise IllegalTransition(event_id, str(state), trigger) from None


@dataclass(frozen=True)
class Relevance:
    relevant: bool
    reason: str


def relevance(event: ScheduledEvent, vm_name: str, enabled_types: Collection[str]) -> Relevance:
    """Whether the event gets our hooks: it names this VM and its type is enabled."""
    if not event.affects(vm_name):
        return Relevance(False, f"for other VMs ({', '.join(event.resources) or 'none'})")
    if event.event_type not in enabled_types:
        return Relevance(False, f"type {event.event_type} is not in events.types")
    return Relevance(True, "names this VM")


@dataclass(frozen=True)
class Decision:
    approve: bool
    reason: str
    code: str  # a fixed word for metrics: prepare_succeeded, shared, mode_never, ...


def decide_approval(
    event: ScheduledEvent,
    *,
    vm_name: str,
    mode: str,
    shared_events: str,
    prepare_succeeded: bool,
    now: datetime,
) -> Decision:
    """README, What the agent does: whether to POST StartRequests for ``event`` now, and why."""
    if event.status != SCHEDULED:
        return Decision(
            False, f"event is {event.status}: it has begun, nothing to approve", "started"
        )
    if event.not_before is not None and event.not_before <= now:
        return Decision(False, "NotBefore has passed: Azure starts it anyway", "not_before_passed")
    if mode == "never":
        return Decision(False, "approval.mode is never", "mode_never")
    if event.is_shared_with_others(vm_name) and shared_events != "approve":
        others = sorted(name for name in event.resources if name.lower() != vm_name.lower())
        return Decision(
            False,
            f"shared with {', '.join(others)}: approving would release them too "
            "(approval.shared_events is skip)",
            "shared",
        )
    if mode == "always":
        outcome = "succeeded" if prepare_succeeded else "failed"
        return Decision(True, f"approval.mode is always (prepare hooks {outcome})", "mode_always")
    if not prepare_succeeded:
        return Decision(
            False, "prepare hooks failed (approval.mode is on-success)", "prepare_failed"
        )
    return Decision(True, "prepare hooks succeeded", "prepare_succeeded")


# With ``NotBefore: ""`` Azure names no moment: the approval is still sent, retried for this long.
NO_DEADLINE_APPROVAL_SECONDS = 60.0
# States in which an event of this VM is being prepared, approved or awaited: recover hooks of
# another event wait while one is in them.
IN_FLIGHT = frozenset({PREPARING, APPROVING, APPROVED, WAITING})
# A hook run in these outcomes did not fail: it was cut short (a crash: no outcome, or a stop)
# and runs again.
_CUT_SHORT = (None, "interrupted")


@dataclass(frozen=True)
class PhaseHooks:
    """A phase's hooks in run order, and the outcome of each one's latest run for this event."""

    names: tuple[str, ...]
    outcomes: Mapping[str, str | None]

    def progress(self) -> tuple[str | None, bool | None]:
        """(the next hook to run, None), or (None, whether the phase succeeded)."""
        for name in self.names:
            if name not in self.outcomes or self.outcomes[name] in _CUT_SHORT:
                return name, None
            if self.outcomes[name] != "succeeded":
                return None, False
        return None, True

    @property
    def started(self) -> bool:
        return bool(self.outcomes)


@dataclass(frozen=True)
class Policy:
    """What the configuration says about approvals and relevance."""

    vm_name: str
    types: Collection[str]
    mode: str = "on-success"
    shared_events: str = "skip"
    dry_run: bool = False
    # hooks.skip_freeze_up_to_seconds (0: never skip) and hooks.skipped_events.
    skip_freeze_up_to_seconds: float = 0.0
    skipped_events: str = "leave"


def short_freeze(event: ScheduledEvent, policy: Policy) -> str | None:
    """Why no hook runs for ``event``: a Freeze of at most hooks.skip_freeze_up_to_seconds
    (DurationInSeconds 0 to the limit; -1, unknown, is never short). None otherwise."""
    limit = policy.skip_freeze_up_to_seconds
    duration = event.duration_seconds
    if limit <= 0 or event.event_type != "Freeze" or duration is None:
        return None
    if not 0 <= duration <= limit:
        return None
    return f"a Freeze of {duration} s (hooks.skip_freeze_up_to_seconds is {limit:g}): {SKIP_MARK}"


SKIP_MARK = "hooks skipped"


def was_skipped(decision: str | None) -> bool:
    """Whether a stored approval decision is one ``short_freeze`` made."""
    return decision is not None and decision.startswith("a Freeze of") and SKIP_MARK in decision


@dataclass(frozen=True)
class Situation:
    """Everything the next step of one event depends on."""

    state: str
    event: ScheduledEvent  # its form in the newest document, else the stored one
    present: bool  # in the document, or absent for less than the grace
    readable: bool  # False while the newest document holds it in a form that cannot be read
    self_service: bool  # a synthetic event of self-service maintenance: never approved here
    prepare: PhaseHooks
    recover: PhaseHooks
    approval_may_have_landed: bool  # a POST succeeded, or was sent and never recorded back
    others_in_flight: bool  # another event is preparing, approving, approved or awaited
    recover_running: bool  # a recover hook of another event runs right now
    now: datetime
    in_document: bool = True  # False while it is missing, within the grace
    skipped_before: bool = False  # its prepare hooks were skipped as a short Freeze
    first_approval_attempt: datetime | None = None  # when the first (failed) POST began


@dataclass(frozen=True)
class RunHook:
    phase: str
    name: str


@dataclass(frozen=True)
class Approve:
    """POST StartRequests now, within ``budget_seconds``."""

    budget_seconds: float
    reason: str


@dataclass(frozen=True)
class Move:
    """Apply ``trigger``. ``outcome`` and ``code`` count a skipped approval, when set."""

    trigger: str
    reason: str
    outcome: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class Wait:
    """Nothing now; look again when another event moves on."""

    reason: str


@dataclass(frozen=True)
class Nothing:
    """Nothing to do until the document or the configuration changes."""


Step = Union[RunHook, Approve, Move, Wait, Nothing]


def next_step(situation: Situation, policy: Policy) -> Step:
    """What to do next for one event: a pure function of its situation and the policy."""
    s = situation
    fit = (
        Relevance(True, "self-service maintenance")
        if s.self_service
        else relevance(s.event, policy.vm_name, policy.types)
    )
    if s.state == DONE:
        return Nothing()
    if s.state == IGNORED:
        if not s.present:
            return Move("gone", "left the document")
        if s.readable and fit.relevant:
            return Move("became_relevant", fit.reason)
        return Nothing()
    skipped = None if s.self_service or s.prepare.started else short_freeze(s.event, policy)
    if s.state == RECOVERING:
        if not s.prepare.started and not s.recover.started and (skipped or s.skipped_before):
            # Skipped then, skipped now: Azure changing the event later does not undo that.
            why = skipped or "its prepare hooks were skipped as a short Freeze"
            return Move("recovered", f"recover hooks skipped: {why}")
        if s.others_in_flight:
            return Wait("another event of this VM is being prepared, approved or awaited")
        name, succeeded = s.recover.progress()
        if name is not None:
            return RunHook("recover", name)
        return Move("recovered", "recover hooks succeeded" if succeeded else "recover hooks failed")
    # Preparing, approving, approved or waiting.
    if not s.present:
        if s.state == PREPARING and not s.prepare.started:
            return Move("gone_before_hooks", "left before any hook ran")
        if s.state == APPROVING:
            return Move("approval_abandoned", "event left the document", "skipped", "event_left")
        return Move("gone", "left the document")
    if not s.readable:
        return Wait("the newest document holds this event in a form that cannot be read")
    if not s.in_document:
        return Wait("missing from the newest document: gone, or back within the grace")
    if not fit.relevant:
        if s.state == PREPARING and not s.prepare.started:
            return Move("irrelevant_before_hooks", fit.reason)
        return Move("no_longer_relevant", fit.reason)
    if s.state in (APPROVING, WAITING) and _hooks_needed(s, skipped):
        return Move("hooks_needed", "no longer a short Freeze: its prepare hooks run")
    if s.state == PREPARING:
        if s.self_service:
            return Nothing()  # self-service runs its prepare hooks, then performMaintenance
        if skipped is not None:
            decision = _decision(s, policy, True, skipped)
            if decision.approve:
                return Move("prepared_approve", decision.reason)
            return Move("prepared_no_approval", decision.reason, "skipped", decision.code)
        name, succeeded = s.prepare.progress()
        if name is not None:
            if s.recover_running:
                return Wait("a recover hook of another event is running")
            return RunHook("prepare", name)
        decision = _decision(s, policy, bool(succeeded))
        if decision.approve:
            return Move("prepared_approve", decision.reason)
        return Move("prepared_no_approval", decision.reason, "skipped", decision.code)
    if s.state == APPROVING:
        if s.approval_may_have_landed:
            return Move(
                "approval_abandoned", "approval sent before a restart", "skipped", "already_sent"
            )
        _, succeeded = s.prepare.progress()
        # Made again from the newest document before every POST: never an earlier decision.
        decision = _decision(s, policy, bool(succeeded), skipped)
        if not decision.approve:
            return Move("approval_abandoned", decision.reason, "skipped", decision.code)
        if policy.dry_run:
            return Move("approval_abandoned", "dry run", "skipped", "dry_run")
        if s.event.not_before is not None:
            return Approve((s.event.not_before - s.now).total_seconds(), decision.reason)
        # No NotBefore: POSTs that fail are tried again, for a bounded time.
        spent = 0.0
        if s.first_approval_attempt is not None:
            spent = (s.now - s.first_approval_attempt).total_seconds()
        if spent >= NO_DEADLINE_APPROVAL_SECONDS:
            return Move(
                "approval_abandoned",
                f"the approval failed for {NO_DEADLINE_APPROVAL_SECONDS:.0f} s",
                "failed",
                "unavailable",
            )
        return Approve(NO_DEADLINE_APPROVAL_SECONDS - spent, decision.reason)
    return Nothing()  # approved or waiting: until the event leaves


def _hooks_needed(s: Situation, skipped: str | None) -> bool:
    """A Freeze skipped as short has grown longer (or its hooks were added) before anything
    was sent for it: it goes back to have its prepare hooks run."""
    return (
        skipped is None
        and not s.self_service
        and bool(s.prepare.names)
        and not s.prepare.started
        and not s.approval_may_have_landed
        and s.event.status == SCHEDULED
    )


def _decision(
    s: Situation, policy: Policy, prepare_succeeded: bool, skipped: str | None = None
) -> Decision:
    decision = _real_decision(s, policy, prepare_succeeded, skipped)
    return _dry(decision, skipped) if policy.dry_run else decision


def _real_decision(
    s: Situation, policy: Policy, prepare_succeeded: bool, skipped: str | None
) -> Decision:
    decision = decide_approval(
        s.event,
        vm_name=policy.vm_name,
        mode=policy.mode,
        shared_events=policy.shared_events,
        prepare_succeeded=prepare_succeeded or skipped is not None,
        now=s.now,
    )
    if skipped is None or decision.code not in ("prepare_succeeded", "mode_always"):
        return decision  # not approved for reasons of its own (started, shared, mode never)
    if policy.skipped_events == "approve":
        return Decision(
            True, f"{skipped}; approved at once (hooks.skipped_events is approve)", "short_freeze"
        )
    return Decision(
        False, f"{skipped}; left to Azure (hooks.skipped_events is leave)", "short_freeze"
    )


def _dry(decision: Decision, skipped: str | None) -> Decision:
    """A dry run's decision says so: no hook ran, so none succeeded."""
    if not decision.approve:
        return Decision(False, f"dry run: would not approve: {decision.reason}", decision.code)
    if skipped is not None:
        return Decision(True, f"dry run: would approve: {decision.reason}", decision.code)
    if decision.code == "prepare_succeeded":
        return Decision(True, "dry run: would approve (no hook was run)", decision.code)
    return Decision(
        True, f"dry run: would approve ({decision.reason}; no hook was run)", decision.code
    )
