"""Prometheus metrics: every metric of the agent, defined here against a registry passed in.

Invariants:
- Names follow Prometheus naming: the ``scheduled_events_agent_`` prefix, base units, ``_total``
  for counters, ``_seconds`` and ``_timestamp_seconds`` for time.
- Labels are bounded: never an event id or a VM name. Event types outside Azure's five become
  ``other``; sources outside Platform and User become ``other``; reasons are fixed codes.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from agent import __version__
from agent.events import KNOWN_TYPES, SCHEDULED, STARTED, ScheduledEvent
from agent.maintenance import parse_iso

# No ``_created`` series (one per counter and histogram child): nothing reads them, and they
# doubled the size of a scrape.
disable_created_metrics()  # type: ignore[no-untyped-call]

PREFIX = "scheduled_events_agent"
SOURCES = ("Platform", "User")
PHASES = ("prepare", "recover")
HOOK_OUTCOMES = ("succeeded", "failed", "timed_out", "refused", "interrupted")
# Approval outcomes and the fixed reasons each may carry.
APPROVAL_REASONS = {
    "succeeded": ("posted",),
    "failed": ("refused", "unavailable"),
    "skipped": (
        "prepare_failed",
        "mode_never",
        "shared",
        "started",
        "not_before_passed",
        "already_sent",
        "event_left",
        "dry_run",
        "no_fleet_slot",
        "short_freeze",
    ),
}
POLL_OUTCOMES = ("changed", "unchanged", "failed")
ENDINGS = ("completed", "cancelled")
THREADS = ("poll", "event", "maintenance", "fleet")
# Why a call to the fleet's coordinator failed: fixed words (see agent/fleet.py).
FLEET_ERRORS = ("unreachable", "auth", "refused", "server", "bad_answer", "no_token", "lost")


def type_label(event_type: str) -> str:
    return event_type if event_type in KNOWN_TYPES else "other"


def source_label(source: str | None) -> str:
    return source if source in SOURCES else "other"


class Metrics:
    """The agent's metrics in ``registry``; each method records one kind of fact.
    ``fleet_backend``: the coordinator configured (None: no fleet, so no fleet error series)."""

    def __init__(self, registry: CollectorRegistry, *, fleet_backend: str | None = None) -> None:
        self.registry = registry
        build = Gauge(
            f"{PREFIX}_build_info", "The agent's version.", ["version"], registry=registry
        )
        build.labels(version=__version__).set(1)
        self.polls = Counter(
            f"{PREFIX}_polls_total",
            "Polls of Scheduled Events, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.poll_duration = Histogram(
            f"{PREFIX}_poll_duration_seconds",
            "Time to fetch and handle the document, retries included.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
            registry=registry,
        )
        self.last_success = Gauge(
            f"{PREFIX}_last_successful_poll_timestamp_seconds",
            "When a poll last succeeded (Unix time).",
            registry=registry,
        )
        self.incarnation = Gauge(
            f"{PREFIX}_document_incarnation",
            "DocumentIncarnation of the last document.",
            registry=registry,
        )
        self.events = Gauge(
            f"{PREFIX}_events",
            "Events now in the document for this VM.",
            ["type", "status"],
            registry=registry,
        )
        self.events_seen = Counter(
            f"{PREFIX}_events_seen_total",
            "Events seen for the first time.",
            ["type", "source"],
            registry=registry,
        )
        self.next_event = Gauge(
            f"{PREFIX}_next_event_timestamp_seconds",
            "Earliest NotBefore among this VM's Scheduled events (Unix time; 0 when none).",
            registry=registry,
        )
        self.next_unapproved = Gauge(
            f"{PREFIX}_next_unapproved_event_timestamp_seconds",
            "Earliest NotBefore among this VM's Scheduled events not approved (0 when none).",
            registry=registry,
        )
        self.prepare_failed = Gauge(
            f"{PREFIX}_pending_events_prepare_failed",
            "Events still in the document whose prepare hooks failed.",
            registry=registry,
        )
        self.hook_runs = Counter(
            f"{PREFIX}_hook_runs_total",
            "Hook runs, by phase and outcome.",
            ["phase", "outcome"],
            registry=registry,
        )
        self.hook_duration = Histogram(
            f"{PREFIX}_hook_duration_seconds",
            "How long hooks ran, retries after exit 75 included.",
            ["phase"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=registry,
        )
        self.approvals = Counter(
            f"{PREFIX}_approvals_total",
            "Approval decisions and POSTs, by outcome and reason.",
            ["outcome", "reason"],
            registry=registry,
        )
        self.approval_lead = Histogram(
            f"{PREFIX}_approval_lead_seconds",
            "How long before NotBefore an approval landed.",
            buckets=(0, 5, 10, 15, 20, 25, 30, 60, 120, 300, 600, 900, 1800, 3600),
            registry=registry,
        )
        self.state_degraded = Gauge(
            f"{PREFIX}_state_degraded",
            "1 while the state store works in memory only (its file cannot be written or"
            " read), or since it found its file damaged at start-up and moved it aside.",
            registry=registry,
        )
        self.window_start = Gauge(
            f"{PREFIX}_maintenance_window_start_timestamp_seconds",
            "Start of this VM's maintenance window (Unix time; 0 when none is planned).",
            ["window"],
            registry=registry,
        )
        self.window_end = Gauge(
            f"{PREFIX}_maintenance_window_end_timestamp_seconds",
            "End of this VM's maintenance window (Unix time; 0 when none is planned).",
            ["window"],
            registry=registry,
        )
        self.self_service_allowed = Gauge(
            f"{PREFIX}_self_service_maintenance_allowed",
            "1 when Azure allows this VM's owner to start its maintenance now.",
            registry=registry,
        )
        self.maintenance_errors = Counter(
            f"{PREFIX}_maintenance_check_errors_total",
            "Failed reads of the maintenance windows, by cause.",
            ["cause"],
            registry=registry,
        )
        self.self_service_runs = Counter(
            f"{PREFIX}_self_service_maintenances_total",
            "Self-service maintenances taken, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.events_ended = Counter(
            f"{PREFIX}_events_ended_total",
            "This VM's events that left the document: completed (after Started) or cancelled"
            " (while Scheduled).",
            ["type", "ending"],
            registry=registry,
        )
        self.approved_elsewhere = Counter(
            f"{PREFIX}_events_approved_elsewhere_total",
            "This VM's events that started before NotBefore without an approval of this agent.",
            ["type"],
            registry=registry,
        )
        self.events_late = Counter(
            f"{PREFIX}_events_late_total",
            "Events first seen already Started, or with NotBefore already passed.",
            ["type"],
            registry=registry,
        )
        self.fleet_slot_held = Gauge(
            f"{PREFIX}_fleet_slot_held",
            "1 while this agent holds one of its group's maintenance slots (fleet).",
            registry=registry,
        )
        self.fleet_slot_wait = Histogram(
            f"{PREFIX}_fleet_slot_wait_seconds",
            "How long an event waited for a fleet slot, whether it got one or not.",
            buckets=(0, 1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200),
            registry=registry,
        )
        self.fleet_slot_missed = Counter(
            f"{PREFIX}_fleet_slot_missed_total",
            "Events that waited for a fleet slot until NotBefore (or their start) without one.",
            registry=registry,
        )
        self.fleet_errors = Counter(
            f"{PREFIX}_fleet_errors_total",
            "Failed calls to the fleet's coordinator, by backend and reason.",
            ["backend", "reason"],
            registry=registry,
        )
        self.unreadable_events = Counter(
            f"{PREFIX}_unreadable_events_total",
            "Entries of the Scheduled Events document that could not be read, each counted once"
            " (its siblings are still handled).",
            registry=registry,
        )
        self.work_failures = Counter(
            f"{PREFIX}_event_work_failures_total",
            "Unexpected errors while working an event (taken up again on the next document).",
            registry=registry,
        )
        self.unexpected_errors = Counter(
            f"{PREFIX}_unexpected_errors_total",
            "Unexpected errors (bugs) in one of the agent's threads, each logged with its"
            " traceback; the thread carries on.",
            ["thread"],
            registry=registry,
        )
        # Every bounded label set exists from the start, so that rates and alerts see zeros.
        for thread in THREADS:
            self.unexpected_errors.labels(thread=thread)
        for outcome in POLL_OUTCOMES:
            self.polls.labels(outcome=outcome)
        for window in ("self_service", "scheduled"):
            self.window_start.labels(window=window)
            self.window_end.labels(window=window)
        for run_outcome in ("succeeded", "failed"):
            self.self_service_runs.labels(outcome=run_outcome)
        for event_type in (*KNOWN_TYPES, "other"):
            self.events_late.labels(type=event_type)
            self.approved_elsewhere.labels(type=event_type)
            for ending in ENDINGS:
                self.events_ended.labels(type=event_type, ending=ending)
            for status in (SCHEDULED, STARTED):
                self.events.labels(type=event_type, status=status).set(0)
        for phase in PHASES:
            self.hook_duration.labels(phase=phase)
            for hook_outcome in HOOK_OUTCOMES:
                self.hook_runs.labels(phase=phase, outcome=hook_outcome)
        if fleet_backend is not None:
            for fleet_error in FLEET_ERRORS:
                self.fleet_errors.labels(backend=fleet_backend, reason=fleet_error)
        for approval_outcome, reasons in APPROVAL_REASONS.items():
            for reason in reasons:
                self.approvals.labels(outcome=approval_outcome, reason=reason)

    def maintenance(self, status: Any) -> None:
        """The windows of ``status`` (an arm.MaintenanceStatus, or None when none is planned)."""
        windows = {
            "self_service": (
                getattr(status, "self_service_start", None),
                getattr(status, "self_service_end", None),
            ),
            "scheduled": (
                getattr(status, "scheduled_start", None),
                getattr(status, "scheduled_end", None),
            ),
        }
        for window, (start, end) in windows.items():
            start_time, end_time = parse_iso(start), parse_iso(end)
            self.window_start.labels(window=window).set(start_time.timestamp() if start_time else 0)
            self.window_end.labels(window=window).set(end_time.timestamp() if end_time else 0)
        self.self_service_allowed.set(1 if getattr(status, "allowed", False) else 0)

    def poll(self, outcome: str, seconds: float, now: datetime | None = None) -> None:
        self.polls.labels(outcome=outcome).inc()
        self.poll_duration.observe(seconds)
        if outcome != "failed" and now is not None:
            self.last_success.set(now.timestamp())

    def document(
        self,
        incarnation: int,
        mine: Iterable[ScheduledEvent],
        approved_keys: Iterable[str],
        prepare_failed: int,
    ) -> None:
        """The state of this VM's events in the newest document."""
        self.incarnation.set(incarnation)
        counts: dict[tuple[str, str], int] = {}
        approved = set(approved_keys)
        next_event = next_unapproved = None
        for event in mine:
            status = event.status if event.status in (SCHEDULED, STARTED) else STARTED
            key = (type_label(event.event_type), status)
            counts[key] = counts.get(key, 0) + 1
            if event.status == SCHEDULED and event.not_before is not None:
                moment = event.not_before.timestamp()
                next_event = moment if next_event is None else min(next_event, moment)
                if event.key not in approved:
                    next_unapproved = (
                        moment if next_unapproved is None else min(next_unapproved, moment)
                    )
        for event_type in (*KNOWN_TYPES, "other"):
            for status in (SCHEDULED, STARTED):
                self.events.labels(type=event_type, status=status).set(
                    counts.get((event_type, status), 0)
                )
        self.next_event.set(next_event or 0)
        self.next_unapproved.set(next_unapproved or 0)
        self.prepare_failed.set(prepare_failed)

    def seen(self, event: ScheduledEvent, *, late: bool) -> None:
        self.events_seen.labels(
            type=type_label(event.event_type), source=source_label(event.source)
        ).inc()
        if late:
            self.events_late.labels(type=type_label(event.event_type)).inc()

    def hook_run(self, phase: str, outcome: str, seconds: float) -> None:
        self.hook_runs.labels(phase=phase, outcome=outcome).inc()
        self.hook_duration.labels(phase=phase).observe(seconds)

    def approval(self, outcome: str, reason: str, lead_seconds: float | None = None) -> None:
        if reason not in APPROVAL_REASONS[outcome]:
            raise ValueError(f"approval reason {reason!r} is not one of {outcome}'s")
        self.approvals.labels(outcome=outcome, reason=reason).inc()
        if lead_seconds is not None:
            self.approval_lead.observe(lead_seconds)
