"""The daemon: poll, and carry out what the lifecycle decides. A thin shell around a pure core.

Invariants:
- What to do next for an event is ``lifecycle.next_step``'s answer, asked again before every
  step from the newest document: a change of type, Resources, NotBefore or configuration is
  taken into account at once, and an approval is always decided just before its POST.
- The poll loop never waits for a hook: each event's work (prepare, approve, recover) runs in a
  worker of its own (``workers.Workers``), so a Preempt's 30 s notice is met while a long
  Reboot hook runs.
- An event is gone only once it has been missing from successful polls for
  ``events.gone_grace_seconds``; while an unreadable entry of the document may be one of ours
  (it names this VM, its EventId cannot be read), nothing is declared gone.
- An EventId that comes back after its record is done is a new occurrence, worked in full.
- Recover hooks wait while any other event of this VM is in flight (``workers.HookGate``).
- An unchanged document (the client hands back the very same object) costs a comparison: no
  planning, no store writes.
- A worker moves straight from the end of its prepare hooks to the approval: it never waits
  for the next poll.
- Every step is recorded in the store before it is taken (see ``state``); after a restart the
  first good document resumes every unfinished event where it stopped.
- Stopping is a flag: waits end early, running hooks get their grace, workers are joined.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from agent import report
from agent.clock import Clock
from agent.config import Config
from agent.errors import (
    ApprovalWithdrawn,
    DocumentError,
    ImdsError,
    ImdsRequestRejected,
    ImdsUnavailable,
    OperationCancelled,
)
from agent.events import (
    SCHEDULED,
    STARTED,
    ScheduledEvent,
    ScheduledEventsDocument,
    UnreadableEvent,
)
from agent.fleet import TICK_SECONDS as FLEET_TICK_SECONDS
from agent.fleet import FleetGate
from agent.hooks import (
    INTERRUPTED,
    SUCCEEDED,
    Hook,
    HookContext,
    HookResult,
    HookRunner,
    deadline_for,
    discover,
    hook_environment,
    process_start,
    stop_orphan,
)
from agent.imds import ImdsClient
from agent.lifecycle import (
    ACTIVE,
    DONE,
    IGNORED,
    IN_FLIGHT,
    PREPARING,
    Approve,
    Move,
    PhaseHooks,
    Policy,
    RunHook,
    Situation,
    Wait,
    next_step,
    relevance,
    was_skipped,
)
from agent.maintenance import parse_iso
from agent.metrics import Metrics, type_label
from agent.selfservice import SelfService, is_self_service
from agent.state import EventRecord, Store
from agent.systemd import Notifier
from agent.workers import HeadStart, HookGate, Workers

POLL_BUDGET_SECONDS = 5.0
# An event whose work failed unexpectedly is taken up again after 1, 2, 4... s, up to this.
WORK_RETRY_MAX_SECONDS = 30.0
_T = TypeVar("_T")


class InjectedFailure(Exception):
    """Raised by a ``raise:`` failpoint: stands for a bug in one of the agent's threads."""


HEARTBEAT_SECONDS = 60.0
# How long taking in a document waits for the workers of this VM's new events to start their
# first hook before it records the other VMs' events.
HEAD_START_SECONDS = 1.0


@dataclass(frozen=True)
class Collaborators:
    """Everything the daemon uses, built by the command line (or a test)."""

    config: Config
    imds: ImdsClient
    hooks: HookRunner
    store: Store
    clock: Clock
    stop: threading.Event
    log: Any
    vm_name: str
    dry_run: bool = False
    check_ownership: bool = False
    failpoints: Collection[str] = ()
    metrics: Metrics | None = None
    notifier: Notifier | None = None
    fleet: FleetGate | None = None


def assemble(
    config: Config,
    *,
    imds: ImdsClient,
    store: Store,
    clock: Clock,
    stop: threading.Event,
    log: Any,
    vm_name: str,
    dry_run: bool = False,
    check_ownership: bool = False,
    failpoints: Collection[str] = (),
    metrics: Metrics | None = None,
    notifier: Notifier | None = None,
    fleet: FleetGate | None = None,
) -> Collaborators:
    """The daemon's parts for ``config``, on ``clock``, with a hook runner set from it."""
    hooks = HookRunner(
        clock,
        stop,
        log,
        kill_grace_seconds=config.hooks.kill_grace_seconds,
        tempfail_retry_seconds=config.hooks.tempfail_retry_seconds,
        check_ownership=check_ownership,
        environment=hook_environment(config.hooks.pass_environment, config.hooks.environment),
    )
    return Collaborators(
        config=config,
        imds=imds,
        hooks=hooks,
        store=store,
        clock=clock,
        stop=stop,
        log=log,
        vm_name=vm_name,
        dry_run=dry_run,
        check_ownership=check_ownership,
        failpoints=failpoints,
        metrics=metrics,
        notifier=notifier,
        fleet=fleet,
    )


class Daemon:
    def __init__(self, parts: Collaborators, *, self_service: SelfService | None = None) -> None:
        self._parts = parts
        self._config = parts.config
        self._store = parts.store
        self._clock = parts.clock
        self._stop = parts.stop
        self._log = parts.log.bind(vm_name=parts.vm_name)
        self._policy = Policy(
            vm_name=parts.vm_name,
            types=parts.config.events.types,
            mode=parts.config.approval.mode,
            shared_events=parts.config.approval.shared_events,
            dry_run=parts.dry_run,
            skip_freeze_up_to_seconds=parts.config.hooks.skip_freeze_up_to_seconds,
            skipped_events=parts.config.hooks.skipped_events,
        )
        self._latest: ScheduledEventsDocument | None = None
        self._handled: ScheduledEventsDocument | None = None
        self._resumed = False
        # Taking in a document and a record reaching its end both create records: one at a time.
        self._intake = threading.RLock()
        self._absent_since: dict[str, float] = {}  # key -> when it was first missing (monotonic)
        self._gone: set[str] = set()  # keys missing for the whole grace (or ended by self-service)
        self._unreadable_seen: set[tuple[str, str, str | None]] = set()
        self._waits_told: dict[str, str] = {}
        self._workers = Workers(self._step_and_tell, stop=parts.stop, on_error=self._work_failed)
        self._head_start = HeadStart()
        self._intake_incomplete = False
        self._intake_failure: str | None = None
        self._gate = HookGate()
        self._approval_failed = False
        self._last_failure: str | None = None
        self._last_heartbeat = float("-inf")
        self._metrics = parts.metrics if parts.metrics is not None else Metrics(CollectorRegistry())
        self._notifier = parts.notifier if parts.notifier is not None else Notifier({})
        self._last_success: float | None = None
        self._last_success_at: datetime | None = None  # its wall-clock time, for status
        self._ready = False
        self._degraded_reported = False
        self._redeploy_for: dict[str, str] = {}  # Redeploy event key -> self-service key
        self._fleet = parts.fleet
        self._retry_lock = threading.Lock()
        self._work_failures: dict[str, int] = {}  # key -> unexpected failures in a row
        self._work_retry_at: dict[str, float] = {}  # key -> when to take it up again
        self._failpoints_lock = threading.Lock()
        self._failpoints_raised: set[str] = set()
        self.self_service = self_service
        if self_service is not None:
            self_service.attach(run_prepare=self.run_prepare, over=self.end_self_service)

    # The loop ------------------------------------------------------------------------------

    def _announce(self, *, once: bool) -> None:
        self._log.info(
            "agent.started",
            imds_url=self._config.imds.url,
            dry_run=self._parts.dry_run,
            once=once,
            poll_interval_seconds=self._config.imds.poll_interval_seconds,
        )

    def run(self) -> int:
        """Poll every interval until stopped; then let running work finish its grace."""
        self._announce(once=False)
        self._report_moved_aside()
        self._stop_orphans()
        interval = self._config.imds.poll_interval_seconds
        watcher = None
        if self._fleet is not None:
            # In a thread of its own: a slow coordinator never delays the first poll, and no
            # worker ever waits on it (the gate wakes a worker when its answer changes).
            self._fleet.use_own_thread()
            self._fleet.on_change = self._wake_all
            threading.Thread(
                target=self._fleet_loop,
                args=(self._fleet, self._fleet_needed()),
                name="fleet",
                daemon=True,
            ).start()
        if self.self_service is not None:
            # Before the watcher may take a new one: wind up one a restart cut short.
            self.self_service.resume()
        if self.self_service is not None and self._config.maintenance.check_interval_seconds > 0:
            watcher = threading.Thread(
                target=self._maintenance_loop, args=(self.self_service,), name="maintenance"
            )
            watcher.daemon = True
            watcher.start()
        while not self._stop.is_set():
            started = self._clock.monotonic()
            self._survive("poll", self._poll_and_tell, None)
            self._clock.wait(interval - (self._clock.monotonic() - started))
        self._notifier.stopping()
        if watcher is not None:
            watcher.join(timeout=60)
        self._workers.join()
        self._log.info("agent.stopped")
        return 0

    def _poll_and_tell(self) -> None:
        self._failpoint("raise:poll")
        self.poll()
        self._notifier.watchdog()
        if self._notifier.enabled:  # no summary to build on every poll for nobody
            self._notifier.status(self.summary())

    def _maintenance_loop(self, self_service: SelfService) -> None:
        """The maintenance watcher's thread: check the windows every interval until stopped."""
        interval = self._config.maintenance.check_interval_seconds

        def check() -> float:
            self._failpoint("raise:maintenance")
            return self_service.check()

        while not self._stop.is_set():
            self._clock.wait(self._survive("maintenance", check, interval))

    def _fleet_loop(self, fleet: FleetGate, needed: dict[str, str]) -> None:
        """The fleet gate's thread: take up what a restart left (``needed``), then renew the
        lease and retry a release until stopped."""
        resumed = False

        def step() -> None:
            nonlocal resumed
            self._failpoint("raise:fleet")
            if not resumed:
                fleet.resume(needed)
                resumed = True
            fleet.tick()

        while not self._stop.is_set():
            self._survive("fleet", step, None)
            fleet.wait(FLEET_TICK_SECONDS)

    def _survive(self, thread: str, action: Callable[[], _T], fallback: _T) -> _T:
        """``action()``; on an unexpected error, logged with its traceback and counted,
        ``fallback``: a thread of the agent never dies of one, it carries on."""
        try:
            return action()
        except Exception as error:
            self._metrics.unexpected_errors.labels(thread=thread).inc()
            self._log.error(
                "thread.unexpected_error",
                thread=thread,
                reason=f"{type(error).__name__}: {error}",
                consequence="the thread carries on",
                exc_info=error,
            )
            return fallback

    def _stop_orphans(self) -> None:
        """Hooks a killed agent left running are stopped before any hook runs again: one hook
        never runs twice at once for an event, whoever supervises the agent."""
        for run_id, pid, started in self._store.orphaned_processes():
            if stop_orphan(pid, started, self._config.hooks.kill_grace_seconds, self._clock):
                self._log.warning(
                    "hook.orphan_stopped",
                    pid=pid,
                    hook_run=run_id,
                    reason="left running by an agent that died; it runs again from the start",
                )

    def health(self) -> tuple[bool, str]:
        """For /healthz: healthy while the last successful poll is recent."""
        if self._last_success is None:
            return False, "no successful poll yet (a cold IMDS can take two minutes)"
        age = self._clock.monotonic() - self._last_success
        limit = max(5 * self._config.imds.poll_interval_seconds, 15.0)
        if age > limit:
            return False, f"last successful poll {age:.0f} s ago: {self._last_failure or 'none'}"
        return True, f"ok: last successful poll {age:.1f} s ago"

    def summary(self) -> str:
        """One line for systemd's STATUS=: ``2 events pending; next in 13m``."""
        if self._store.degraded is not None:
            return f"state store {self._store.degraded[:120]}; working in memory"
        if self._last_failure is not None:
            return f"IMDS failing: {self._last_failure}"[:200]
        latest = self._latest
        if latest is None:
            return "waiting for the first document"
        mine = latest.affecting(self._parts.vm_name)
        if not mine:
            return "no events pending"
        now = self._clock.now()
        upcoming = [e.not_before for e in mine if e.not_before is not None and e.not_before > now]
        text = f"{len(mine)} event{'s' if len(mine) != 1 else ''} pending"
        if upcoming:
            seconds = (min(upcoming) - now).total_seconds()
            text += (
                f"; next in {seconds / 60:.0f}m" if seconds >= 60 else f"; next in {seconds:.0f}s"
            )
        return text

    def run_once(self) -> int:
        """One poll, handled fully: every worker it starts runs to its end. An event missing
        from the document is polled for until its grace is over, so that it is recovered now.

        1 when the poll failed or an approval could not be sent."""
        self._announce(once=True)
        self._report_moved_aside()
        self._stop_orphans()
        if self._fleet is not None:
            self._fleet.resume(self._fleet_needed())
        if self.self_service is not None:
            self.self_service.resume()
        ok = self.poll(budget_seconds=10.0)
        interval = self._config.imds.poll_interval_seconds
        # Bounded: an unreadable entry that may be ours suspends the grace for as long as it
        # stays; the next run takes it up again.
        until = self._clock.monotonic() + self._config.events.gone_grace_seconds + 5 * interval
        while (
            ok
            and self._absent_since
            and not self._stop.is_set()
            and self._clock.monotonic() < until
        ):
            self._workers.join()
            self._clock.wait(interval)
            ok = self.poll(budget_seconds=10.0)
        if self.self_service is not None and self._config.maintenance.check_interval_seconds > 0:
            self.self_service.check()
        self._workers.join()
        return 0 if ok and not self._approval_failed else 1

    def poll(self, budget_seconds: float = POLL_BUDGET_SECONDS) -> bool:
        started = self._clock.monotonic()
        try:
            document = self._parts.imds.fetch_scheduled_events(budget_seconds=budget_seconds)
        except OperationCancelled:
            return False
        except (ImdsError, DocumentError) as error:
            self._metrics.poll("failed", self._clock.monotonic() - started)
            # A failure that repeats is logged once, and again only when it changes; attempt
            # counts and timings are not part of what "changes" means.
            signature = error.cause if isinstance(error, ImdsUnavailable) else str(error)
            if signature != self._last_failure:
                self._log.error("imds.poll_failed", reason=str(error))
                self._last_failure = signature
            return False
        if self._last_failure is not None:
            self._log.info("imds.poll_recovered", after=self._last_failure)
            self._last_failure = None
        self._latest = document
        changed = document is not self._handled
        if changed:
            self._intake_incomplete = False
            self._handle(document)
            # Taken in again by the next poll when other VMs' events could not be recorded.
            self._handled = None if self._intake_incomplete else document
            self._refresh_gauges()
        self._expire_absent(document)
        self._retry_failed_work()
        self._last_success = self._clock.monotonic()
        self._last_success_at = self._clock.now()
        self._metrics.poll(
            "changed" if changed else "unchanged",
            self._last_success - started,
            self._clock.now(),
        )
        if not self._ready:
            self._ready = True
            self._notifier.ready(self.summary())
        self._heartbeat(document)
        self._report_degraded_state()
        return True

    def _fleet_needed(self) -> dict[str, str]:
        """The events that keep the fleet slot after a restart: approved and not over yet,
        and self-service maintenances not wound up (the gate gives back anything else)."""
        return {
            record.key: record.event_id
            for record in self._store.events(states=ACTIVE)
            if is_self_service(record.key) or self._store.approval_may_have_landed(record.key)
        }

    def _report_degraded_state(self) -> None:
        """Say loudly, once, that the state store lost its file and works in memory."""
        if self._store.degraded is None or self._degraded_reported:
            return
        self._degraded_reported = True
        self._metrics.state_degraded.set(1)
        self._log.error(
            "state.degraded",
            path=self._store.path,
            reason=self._store.degraded,
            consequence="events are still handled, but a crash or reboot now forgets what was "
            "done since; nothing already written to the file is lost",
            hint="fix the disk or permissions of state.path, then restart the agent",
        )

    def _report_moved_aside(self) -> None:
        """Say loudly that the state file was found damaged at start-up and replaced."""
        if self._store.moved_aside is None:
            return
        aside, damage = self._store.moved_aside
        self._metrics.state_degraded.set(1)
        self._log.error(
            "state.moved_aside",
            path=self._store.path,
            moved_to=aside,
            reason=damage,
            consequence="the agent starts with an empty history: hooks of an event under way "
            "run again, and an approval already sent may be sent once more (Azure takes it as "
            "a no-op); the damaged file is kept for inspection",
        )

    def _refresh_gauges(self) -> None:
        """Set the gauges that describe this VM's events in the newest document."""
        latest = self._latest
        if latest is None:
            return
        vm_name = self._parts.vm_name
        mine = latest.affecting(vm_name)
        approved = []
        prepare_failed = 0
        for event in mine:
            if self._store.approval_may_have_landed(event.key):
                approved.append(event.key)
            runs = self._store.hook_runs(event.key, "prepare")
            if any(run.outcome not in (None, "succeeded", "interrupted") for run in runs):
                prepare_failed += 1
        # An entry that cannot be read but names this VM is never approved: a failed prepare.
        prepare_failed += sum(1 for entry in latest.unreadable if entry.may_affect(vm_name))
        self._metrics.document(latest.incarnation, mine, approved, prepare_failed)

    def live_status(self) -> dict[str, Any]:
        """What ``status`` shows, current to the last poll: the store's records, with the
        last poll and incarnation from memory (the store has them once a minute)."""
        status = report.status(self._store)
        latest = self._latest
        status.update(
            source="live",
            pid=os.getpid(),
            dry_run=self._parts.dry_run,
            state_path=self._store.path,
            vm_name=self._parts.vm_name,
            last_poll_at=(
                self._last_success_at.isoformat(timespec="seconds")
                if self._last_success_at is not None
                else None
            ),
            document_incarnation=latest.incarnation if latest is not None else None,
            healthy=self.health()[0],
        )
        return status

    def _heartbeat(self, document: ScheduledEventsDocument) -> None:
        now = self._clock.monotonic()
        if self._parts.dry_run or now - self._last_heartbeat < HEARTBEAT_SECONDS:
            return
        self._last_heartbeat = now
        self._store.set_meta(
            last_poll_at=self._clock.now().isoformat(timespec="seconds"),
            document_incarnation=str(document.incarnation),
            vm_name=self._parts.vm_name,
        )

    # Taking in a document ------------------------------------------------------------------

    def _handle(self, document: ScheduledEventsDocument) -> None:
        vm_name = self._parts.vm_name
        incarnation = document.incarnation
        with self._intake:
            # This VM's own events first, read without the rest of the document, each
            # recorded and handed to its worker at once: a document can carry thousands of
            # other VMs' events, and a Preempt gives 30 seconds.
            own = document.affecting(vm_name)
            for event in own:
                self._absent_since.pop(event.key, None)
                self._gone.discard(event.key)
                self._take_in_safely(event, incarnation)
        # Their new workers go first, up to their first hook; the rest waits that long.
        self._head_start.wait([event.key for event in own], HEAD_START_SECONDS, self._stop)
        with self._intake:
            self._report_unreadable(document.unreadable)
            present = {event.key for event in document.events} | document.unreadable_ids()
            others = []
            for event in document.events:
                self._absent_since.pop(event.key, None)
                self._gone.discard(event.key)
                if not event.affects(vm_name):
                    others.append(event)
            self._take_in_others(others, incarnation)
            for key in document.unreadable_ids():
                self._absent_since.pop(key, None)
                self._gone.discard(key)
            now = self._clock.monotonic()
            unfinished = self._store.known_unfinished()
            for key in unfinished:
                if not is_self_service(key) and key not in present and key not in self._gone:
                    self._absent_since.setdefault(key, now)
            self._resumed = True
        # Every unfinished event looks again: the document may have changed what it needs,
        # and work that failed unexpectedly is taken up again here. An ignored event still in
        # the document has nothing to do (it would only look and go back to sleep).
        for key, (state, form) in unfinished.items():
            if not self._idle(state, form, present=key in present):
                self._workers.wake(key)

    def _idle(self, state: str, form: ScheduledEvent | None, *, present: bool) -> bool:
        """True for an ignored event still in the document and still not this VM's."""
        if state != IGNORED or not present or form is None:
            return False
        return not relevance(form, self._parts.vm_name, self._config.events.types).relevant

    def _step_and_tell(self, key: str) -> bool:
        """One step of the key's work; the head start is over when it has nothing more to do
        now (or fails). Starting a hook ends it too (``_run_one``)."""
        try:
            more = self._step(key)
        except BaseException:
            self._head_start.reached(key)
            raise
        if not more:
            self._head_start.reached(key)
        return more

    def _take_in_safely(self, event: ScheduledEvent, incarnation: int) -> None:
        try:
            self._take_in(event, incarnation)
        except Exception as error:  # one event must never stop the others, or the loop
            self._work_failed(event.key, error)

    def _take_in_others(self, events: list[ScheduledEvent], incarnation: int) -> None:
        """Record other VMs' events: the new ones and the changed ones in one transaction
        each, whatever their number."""
        unfinished = self._store.known_unfinished()
        changed = [e for e in events if e.key in unfinished and unfinished[e.key][1] != e]
        unseen = [e for e in events if e.key not in unfinished]
        recorded = self._store.recorded([event.key for event in unseen])
        now = self._clock.now()
        try:
            self._store.update_events(changed, incarnation, now)
            new = []
            for event in unseen:
                if event.key in recorded:
                    continue
                fit = relevance(event, self._parts.vm_name, self._config.events.types)
                new.append((event, fit.reason))
            self._store.discover_ignored(new, document_incarnation=incarnation, now=now)
        except Exception as error:  # never the end of the loop: the next poll tries again
            self._intake_incomplete = True
            reason = f"{type(error).__name__}: {error}"
            if reason != self._intake_failure:
                self._intake_failure = reason
                self._metrics.unexpected_errors.labels(thread="poll").inc()
                self._log.error(
                    "document.intake_failed",
                    events=len(changed) + len(unseen),
                    reason=reason,
                    consequence="other VMs' events are not recorded yet; the next poll takes "
                    "the document in again (this VM's own events are not affected)",
                    exc_info=error,
                )
            return
        self._intake_failure = None
        for event in changed:
            self._told_changed(event)
        for event, reason in new:
            self._metrics.seen(event, late=False)
            self._told_discovered(event, relevant=False, reason=reason)
        for event in unseen:
            if event.key in recorded:  # back after it was over: a new occurrence
                self._take_in_safely(event, incarnation)

    def _take_in(self, event: ScheduledEvent, incarnation: int) -> None:
        """Record an event of the newest document: new, a new occurrence, or a new form."""
        now = self._clock.now()
        record = self._store.get(event.key)
        if record is not None and record.state != DONE:
            if record.event != event:
                self._store.update_event(event, incarnation, now)
                self._told_changed(event)
                self._check_approved_elsewhere(record, event, now)
                if event.affects(self._parts.vm_name):
                    # This VM's: worked now, before the other VMs' events are taken in. One
                    # that was ignored and now names this VM gets the head start a new one does.
                    fit = relevance(event, self._parts.vm_name, self._config.events.types)
                    if record.state == IGNORED and fit.relevant:
                        self._head_start.expect(event.key)
                    self._workers.wake(event.key)
            return
        fit = relevance(event, self._parts.vm_name, self._config.events.types)
        late = fit.relevant and (
            event.status != "Scheduled"
            or (event.not_before is not None and event.not_before <= now)
        )
        self._metrics.seen(event, late=late)
        if record is None:
            self._store.discover(
                event,
                relevant=fit.relevant,
                reason=fit.reason,
                document_incarnation=incarnation,
                now=now,
            )
        else:
            # Back after it was over: a new occurrence, worked in full. Never ignored.
            record = self._store.new_occurrence(
                event,
                relevant=fit.relevant,
                reason=fit.reason,
                document_incarnation=incarnation,
                now=now,
            )
            self._log.warning(
                "event.new_occurrence", event_id=event.event_id, occurrence=record.occurrence
            )
        self._told_discovered(event, relevant=fit.relevant, reason=fit.reason)
        if fit.relevant and event.event_type == "Redeploy" and self.self_service is not None:
            awaited = self.self_service.take_awaiting_redeploy()
            if awaited is not None:
                # The Redeploy that follows our performMaintenance: when it leaves, the VM
                # is back and the self-service maintenance is over.
                self._redeploy_for[event.key] = awaited
        if fit.relevant:
            self._head_start.expect(event.key)
        self._workers.wake(event.key)

    def _check_approved_elsewhere(
        self, record: EventRecord, event: ScheduledEvent, now: datetime
    ) -> None:
        """An event of this VM that went from Scheduled to Started before its NotBefore
        without our approval was approved by someone else: ``az maintenance scheduledevents
        acknowledge``, the VM's scheduledEventsPolicy, or another VM of a shared event."""
        before = record.event
        if (
            record.state in (IGNORED, DONE)
            or before.status != SCHEDULED
            or event.status != STARTED
            or before.not_before is None
            or now >= before.not_before  # NotBefore passed: Azure starts it anyway
            or self._store.approval_may_have_landed(record.key)
        ):
            return
        self._store.approved_elsewhere(record.key, now)
        self._metrics.approved_elsewhere.labels(type=type_label(event.event_type)).inc()
        prepared = record.state != PREPARING
        (self._log.info if prepared else self._log.warning)(
            "event.approved_elsewhere",
            event_id=event.event_id,
            not_before=before.not_before_text,
            early_seconds=round((before.not_before - now).total_seconds(), 1),
            prepare_finished=prepared,
            consequence=(
                "it started before NotBefore without our approval"
                if prepared
                else "the maintenance began before its prepare hooks finished"
            ),
        )

    def _told_changed(self, event: ScheduledEvent) -> None:
        self._log.info(
            "event.started" if event.status == "Started" else "event.changed",
            event_id=event.event_id,
            status=event.status,
            event_type=event.event_type,
            not_before=event.not_before_text,
            resources=list(event.resources),
        )

    def _told_discovered(self, event: ScheduledEvent, *, relevant: bool, reason: str) -> None:
        self._log.info(
            "event.discovered" if relevant else "event.ignored",
            event_id=event.event_id,
            event_type=event.event_type,
            status=event.status,
            not_before=event.not_before_text,
            resources=list(event.resources),
            reason=reason,
        )

    def _report_unreadable(self, entries: tuple[UnreadableEvent, ...]) -> None:
        """Say once, with its JSON path, that an entry of the document cannot be read."""
        for entry in entries:
            if entry.signature() in self._unreadable_seen:
                continue
            self._unreadable_seen.add(entry.signature())
            self._metrics.unreadable_events.inc()
            mine = entry.may_affect(self._parts.vm_name)
            self._log.error(
                "document.unreadable",
                path=entry.path,
                reason=entry.reason,
                event_id=entry.event_id,
                resources=list(entry.resources) if entry.resources is not None else None,
                consequence=(
                    "it names this VM: it is counted as a failed prepare and never approved"
                    if mine
                    else "it is skipped; the other events are handled"
                ),
            )

    def _expire_absent(self, document: ScheduledEventsDocument) -> None:
        """Events missing for the whole grace are gone; checked on every successful poll."""
        if not self._absent_since:
            return
        vm_name = self._parts.vm_name
        if any(e.event_id is None and e.may_affect(vm_name) for e in document.unreadable):
            return  # it may be one of ours, under an EventId we cannot read: wait and see
        now = self._clock.monotonic()
        grace = self._config.events.gone_grace_seconds
        gone = []
        with self._intake:
            for key, since in list(self._absent_since.items()):
                if now - since >= grace:
                    del self._absent_since[key]
                    self._gone.add(key)
                    gone.append((key, now - since))
        for key, absent in gone:
            record = self._store.get(key)
            # Left after it was seen Started: it is over. Left while Scheduled: cancelled.
            ending = None
            if record is not None:
                ending = "completed" if record.event.status == STARTED else "cancelled"
                if record.state != IGNORED:
                    self._metrics.events_ended.labels(
                        type=type_label(record.event_type), ending=ending
                    ).inc()
            self._log.info(
                "event.gone",
                event_id=record.event_id if record else key,
                state=record.state if record else None,
                ending=ending,
                absent_seconds=round(absent, 1),
            )
            self._workers.wake(key)
            awaited = self._redeploy_for.pop(key, None)
            if awaited is not None:
                self.end_self_service(awaited)

    def end_self_service(self, key: str) -> None:
        """A self-service maintenance is over (or cut short): its recover hooks are due."""
        key = key.lower()  # as the store keys it
        with self._intake:
            self._gone.add(key)
        self._workers.wake(key)

    # Work on one event ---------------------------------------------------------------------

    def _situation(self, record: EventRecord, *, pending: int | None = None) -> Situation:
        """What ``next_step`` needs; ``pending`` is an approval being sent right now."""
        key = record.key
        synthetic = is_self_service(key)
        latest = self._latest
        current = None if synthetic or latest is None else latest.find(record.event_id)
        unreadable = (
            not synthetic
            and current is None
            and latest is not None
            and key in latest.unreadable_ids()
        )
        approvals = [a for a in self._store.approvals(key) if a.id != pending]
        failed = [a for a in approvals if a.outcome == "failed"]
        return Situation(
            state=record.state,
            event=current if current is not None else record.event,
            present=key not in self._gone and (synthetic or record.gone_at is None),
            readable=not unreadable,
            self_service=synthetic,
            prepare=self._phase_hooks(key, "prepare", record.event_type),
            recover=self._phase_hooks(key, "recover", record.event_type),
            approval_may_have_landed=any(a.outcome in ("succeeded", None) for a in approvals),
            others_in_flight=self._others_in_flight(key),
            recover_running=self._gate.recover_running(key),
            now=self._clock.now(),
            in_document=synthetic or current is not None or unreadable,
            first_approval_attempt=parse_iso(failed[0].started_at) if failed else None,
            skipped_before=was_skipped(record.decision),
        )

    def _hooks(self, phase: str) -> list[Hook]:
        settings = self._config.hooks
        directory = Path(settings.prepare_dir if phase == "prepare" else settings.recover_dir)
        return discover(directory, check_ownership=self._parts.check_ownership)

    def _phase_hooks(self, key: str, phase: str, event_type: str) -> PhaseHooks:
        """The phase's hooks for an event of ``event_type`` (hooks.event_types), and the
        outcome of each one's latest run."""
        latest: dict[str, str | None] = {}
        for run in self._store.hook_runs(key, phase):
            latest[run.hook] = run.outcome
        only = self._config.hooks.event_types
        names = tuple(
            hook.name
            for hook in self._hooks(phase)
            if hook.name not in only or event_type in only[hook.name]
        )
        return PhaseHooks(names, latest)

    def _step(self, key: str) -> bool:
        """Carry out the next step of one event; False when there is nothing more to do now."""
        self._failpoint("raise:event")
        record = self._store.get(key)
        if record is None:
            return False
        step = next_step(self._situation(record), self._policy)
        if isinstance(step, RunHook):
            return self._run_hook(record, step.phase, step.name)
        if isinstance(step, Approve):
            return self._approve(record, step)
        if isinstance(step, Move):
            return self._move(record, step)
        if isinstance(step, Wait) and self._waits_told.get(key) != step.reason:
            self._waits_told[key] = step.reason
            self._log.info("event.waiting", event_id=record.event_id, reason=step.reason)
        return False

    def _move(self, record: EventRecord, step: Move) -> bool:
        key = record.key
        now = self._clock.now()
        event = self._current(record)
        reason, code = step.reason, step.code
        decision = None
        if step.trigger in ("prepared_approve", "prepared_no_approval", "approval_abandoned"):
            if (
                step.trigger == "approval_abandoned"
                and self._fleet is not None
                and self._fleet.waiting(key)
            ):
                missed = code in ("not_before_passed", "started")
                self._fleet.stop_waiting(key, missed=missed)
                if missed:
                    reason, code = (
                        f"no fleet slot before the event began ({reason})",
                        "no_fleet_slot",
                    )
            if step.trigger != "approval_abandoned":
                self._log.info(
                    "event.approval_decision",
                    event_id=record.event_id,
                    approve=step.trigger == "prepared_approve",
                    reason=reason,
                )
                self._failpoint("after-prepare")
            elif code == "dry_run":
                self._log.info("event.would_approve", event_id=record.event_id)
            elif code == "already_sent":
                # A POST went out before a restart and was never recorded back: it may have
                # landed, and an event is never approved twice.
                self._log.warning("event.approval_not_repeated", event_id=record.event_id)
            else:
                self._log.info("event.approval_abandoned", event_id=record.event_id, reason=reason)
            decision = reason
        elif step.trigger == "gone" and record.state == PREPARING:
            self._log.info("event.prepare_cut_short", event_id=record.event_id)
        elif step.trigger == "hooks_needed":
            if self._fleet is not None:
                self._fleet.stop_waiting(key, missed=False)
            self._log.info("event.hooks_needed", event_id=record.event_id, reason=reason)
        elif step.trigger in ("no_longer_relevant", "irrelevant_before_hooks", "became_relevant"):
            self._log.info(
                "event.relevance_changed",
                event_id=record.event_id,
                relevant=step.trigger == "became_relevant",
                reason=reason,
            )
        if step.outcome is not None and code is not None:
            self._metrics.approval(step.outcome, code)
            if code == "not_before_passed":
                self._metrics.events_late.labels(type=type_label(event.event_type)).inc()
        relevance_reason = reason if step.trigger in _RELEVANCE_TRIGGERS else None
        state = self._store.move(key, step.trigger, now, decision=decision, reason=relevance_reason)
        if step.trigger == "recovered":
            self._log.info(
                "event.recover_failed" if reason == "recover hooks failed" else "event.recovered",
                event_id=record.event_id,
                reason=reason,
            )
        if state == DONE:
            self._finished(record, reason)
        self._refresh_gauges()
        self._wake_others(key)
        return state != DONE

    def _finished(self, record: EventRecord, reason: str) -> None:
        """The record is done: its slot and the recover gate are free, and if its EventId is
        in the document again, that is a new occurrence."""
        key = record.key
        self._gate.recover_finished(key)
        if self._fleet is not None:
            self._fleet.release(key)
        if record.state != "recovering":
            self._log.info("event.done", event_id=record.event_id, reason=reason)
        latest = self._latest
        event = None if latest is None or is_self_service(key) else latest.find(record.event_id)
        if event is not None and key not in self._gone:
            with self._intake:
                self._take_in(event, latest.incarnation if latest is not None else 0)

    def _wake_all(self, keys: list[str]) -> None:
        for key in keys:
            self._workers.wake(key)

    def _wake_others(self, key: str) -> None:
        """Another event's step may have freed what these wait for. An ignored event waits
        for nothing (its leaving and its coming to name this VM wake it themselves): a
        document with thousands of them must not start a thread for each."""
        for other, (state, _) in self._store.known_unfinished().items():
            if other != key and state != IGNORED:
                self._workers.wake(other)

    def _current(self, record: EventRecord) -> ScheduledEvent:
        """The event's form in the newest document, or the stored one."""
        latest = self._latest
        if latest is None or is_self_service(record.key):
            return record.event
        found = latest.find(record.event_id)
        return found if found is not None else record.event

    def _approve(self, record: EventRecord, step: Approve) -> bool:
        key = record.key
        event = self._current(record)
        if self._fleet is not None:
            had_slot = self._fleet.holds(key)
            if not self._fleet.hold(
                key, event.event_id, event_type=event.event_type, not_before=event.not_before
            ):
                # No slot yet (or no answer from the coordinator): no early approval now. The
                # gate wakes this worker after each try; ``run --once`` tries again next run.
                return False
            if not had_slot:
                return True  # the slot took a while to get: decide again before the POST
        approval_id = self._store.approval_started(key, "agent", self._clock.now())

        def still_wanted() -> bool:
            # Asked before every try of the POST: the decision, made again from the newest
            # document, must still be "approve" (the POST in flight is not "sent before"), and
            # the fleet slot must still be ours (a lapsed or lost one is another VM's now).
            if self._fleet is not None and not self._fleet.granted(key):
                return False
            current = self._store.get(key)
            return current is not None and isinstance(
                next_step(self._situation(current, pending=approval_id), self._policy), Approve
            )

        try:
            self._parts.imds.approve(
                [event.event_id], budget_seconds=step.budget_seconds, still_wanted=still_wanted
            )
        except ApprovalWithdrawn:
            self._store.approval_finished(approval_id, "withdrawn", self._clock.now())
            self._log.info("event.approval_withdrawn", event_id=event.event_id)
            return True  # decide again: the newest document says what now
        except OperationCancelled:
            self._store.approval_finished(approval_id, "interrupted", self._clock.now())
            return False
        except ImdsError as error:
            refused = isinstance(error, ImdsRequestRejected)
            outcome = "refused" if refused else "failed"
            self._store.approval_finished(approval_id, outcome, self._clock.now(), str(error))
            self._log.error("event.approval_failed", event_id=event.event_id, reason=str(error))
            self._approval_failed = True
            return self._move(
                record,
                Move(
                    "approval_abandoned",
                    str(error),
                    "failed",
                    outcome if refused else "unavailable",
                ),
            )
        self._failpoint("after-approval")
        landed = self._clock.now()
        self._store.approval_finished(approval_id, "succeeded", landed)
        self._store.move(key, "approval_succeeded", landed)
        lead = (event.not_before - landed).total_seconds() if event.not_before else None
        self._metrics.approval("succeeded", "posted", lead)
        self._refresh_gauges()
        self._log.info("event.approved", event_id=event.event_id, lead_seconds=lead)
        self._wake_others(key)
        return True

    def _run_hook(self, record: EventRecord, phase: str, name: str) -> bool:
        """Run one hook for the event, once the gate lets it start; True when it ran."""
        key = record.key
        hook = next((hook for hook in self._hooks(phase) if hook.name == name), None)
        if hook is None:
            return True  # gone from the directory meanwhile: decide again
        if phase == "prepare":
            if not self._gate.try_prepare(key):
                return False  # a recover hook runs: woken when it ends
        elif not self._gate.try_recover(key, lambda: self._others_in_flight(key)):
            return False  # woken when the other event moves on
        try:
            if not self._store.hook_runs(key, phase):
                self._failpoint(f"before-{phase}-hooks")
            result = self._run_one(hook, phase, self._current(record))
        finally:
            self._gate.hook_ended(key, phase)
            self._wake_others(key)
        return result.outcome != INTERRUPTED

    def _others_in_flight(self, key: str) -> bool:
        return any(
            other != key and state in IN_FLIGHT
            for other, (state, _) in self._store.known_unfinished().items()
        )

    def _run_one(self, hook: Hook, phase: str, event: ScheduledEvent) -> HookResult:
        now = self._clock.now()
        deadline = deadline_for(phase, event, now, self._config.hooks.timeout_seconds)
        run_id = self._store.hook_started(event.key, phase, hook.name, now, deadline)
        if self._parts.dry_run:
            self._log.info("hook.would_run", hook=hook.name, phase=phase, event_id=event.event_id)
            result = HookResult(hook.name, SUCCEEDED, None, 0, "dry run: not run", now, now)
        else:
            incarnation = self._latest.incarnation if self._latest is not None else 0
            result = self._parts.hooks.run(
                hook,
                HookContext(phase, event, self._parts.vm_name, incarnation, deadline),
                self._moving_deadline(phase, event, now, deadline),
                lambda pid: self._hook_process_started(event.key, run_id, pid),
            )
            self._metrics.hook_run(
                phase, result.outcome, (result.ended_at - result.started_at).total_seconds()
            )
        self._store.hook_finished(run_id, result)
        return result

    def _hook_process_started(self, key: str, run_id: int, pid: int) -> None:
        self._head_start.reached(key)
        self._store.hook_process(run_id, pid, process_start(pid))

    def _moving_deadline(
        self, phase: str, event: ScheduledEvent, started: datetime, first: datetime
    ) -> Callable[[], datetime]:
        """The running hook's deadline as the newest document says: a NotBefore that moves
        moves it; once the event has started (no NotBefore any more) the last one holds."""
        last = first
        timeout = self._config.hooks.timeout_seconds

        def deadline() -> datetime:
            nonlocal last
            latest = self._latest
            current = (
                None
                if latest is None or is_self_service(event.key)
                else latest.find(event.event_id)
            )
            if current is not None and current.not_before is not None:
                last = deadline_for(phase, current, started, timeout)
            return last

        return deadline

    def run_prepare(self, event: ScheduledEvent) -> bool | None:
        """Run the prepare hooks of a self-service maintenance in the caller's thread.

        True when all succeeded (no hooks counts), False at the first failure, None if stopped.
        """
        while True:
            name, succeeded = self._phase_hooks(event.key, "prepare", event.event_type).progress()
            if name is None:
                return succeeded
            if self._stop.is_set():
                return None
            hook = next((hook for hook in self._hooks("prepare") if hook.name == name), None)
            if hook is None:
                continue
            if not self._gate.try_prepare(event.key):
                self._clock.wait(0.2)  # a recover hook runs: prepare after it
                continue
            try:
                result = self._run_one(hook, "prepare", event)
            finally:
                self._gate.hook_ended(event.key, "prepare")
                self._wake_others(event.key)
            if result.outcome == INTERRUPTED:
                return None

    def _work_failed(self, key: str, error: BaseException) -> None:
        """An unexpected error in an event's work: logged with its traceback, counted; the
        event is taken up again on the next changed document."""
        self._metrics.work_failures.inc()
        self._metrics.unexpected_errors.labels(thread="event").inc()
        self._gate.recover_finished(key)
        with self._retry_lock:
            failures = self._work_failures.get(key, 0) + 1
            self._work_failures[key] = failures
            wait = min(WORK_RETRY_MAX_SECONDS, 2.0 ** (failures - 1))
            self._work_retry_at[key] = self._clock.monotonic() + wait
        self._log.error(
            "event.work_failed",
            event_id=key,
            thread="event",
            reason=f"{type(error).__name__}: {error}",
            consequence=f"the event is taken up again in {wait:g} s, or on a changed document",
            exc_info=error,
        )

    def _retry_failed_work(self) -> None:
        """Wake the events whose work failed unexpectedly once their wait is over (it doubles
        with each failure in a row, up to WORK_RETRY_MAX_SECONDS)."""
        now = self._clock.monotonic()
        with self._retry_lock:
            due = [key for key, at in self._work_retry_at.items() if at <= now]
            for key in due:
                del self._work_retry_at[key]
        unfinished = self._store.known_unfinished() if due else {}
        for key in due:
            if key in unfinished:
                self._workers.wake(key)
            else:
                with self._retry_lock:
                    self._work_failures.pop(key, None)

    def _failpoint(self, name: str) -> None:
        """Testing aid (SCHEDULED_EVENTS_AGENT_FAILPOINTS): die here, as ``kill -9`` would
        (tests/test_crash.py); or, for a ``raise:`` point, raise once (a thread's bug)."""
        if name not in self._parts.failpoints:
            return
        if not name.startswith("raise:"):
            os.kill(os.getpid(), signal.SIGKILL)
        with self._failpoints_lock:
            if name in self._failpoints_raised:
                return
            self._failpoints_raised.add(name)
        raise InjectedFailure(f"failpoint {name}")


_RELEVANCE_TRIGGERS = ("became_relevant", "irrelevant_before_hooks", "no_longer_relevant")
