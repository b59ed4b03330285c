"""The per-event lifecycle and the decisions about it: pure functions of the document, the stored
states, the configuration and the time. The daemon only carries the decisions out.

The transition table below is the whole lifecycle; a move it does not list raises
IllegalTransition naming the event, its state and the trigger.

    (new) --discovered--------------> preparing --prepared_approve----> approving
    (new) --discovered_ignored------> ignored      |                      |  approval_succeeded
                                                   | prepared_no_approval |  approval_abandoned
                                                   v                      v
                                                 waiting <------------ approved
    preparing/approving/approved/waiting --gone--> recovering --recovered--> done
    preparing --gone_before_hooks--> done          ignored --gone--> done
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime

from agent.errors import IllegalTransition
from agent.events import SCHEDULED, ScheduledEvent, ScheduledEventsDocument

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


@dataclass(frozen=True)
class Plan:
    """What a changed document asks of the daemon."""

    discovered: tuple[tuple[ScheduledEvent, Relevance], ...]
    changed: tuple[ScheduledEvent, ...]
    gone: tuple[str, ...]


def plan(
    document: ScheduledEventsDocument,
    known: Mapping[str, tuple[str, ScheduledEvent | None]],
    vm_name: str,
    enabled_types: Collection[str],
) -> Plan:
    """Compare a document with the stored events (key -> (state, last seen event)).

    New events are discovered (relevant or ignored); stored events whose fields changed are
    reported so the store keeps their latest form; stored events not done and absent from the
    document are gone (over, or cancelled).
    """
    present = {event.key for event in document.events}
    discovered = []
    changed = []
    for event in document.events:
        if event.key not in known:
            discovered.append((event, relevance(event, vm_name, enabled_types)))
            continue
        _, last = known[event.key]
        if last != event:
            changed.append(event)
    gone = [key for key, (state, _) in known.items() if state != DONE and key not in present]
    return Plan(tuple(discovered), tuple(changed), tuple(sorted(gone)))
