"""The daemon: poll, and carry out what the lifecycle decides. A thin shell around a pure core.

Invariants:
- The poll loop never waits for a hook: each event's work (prepare, approve, recover) runs in a
  worker thread of its own, so a Preempt's 30 s notice is met while a long Reboot hook runs.
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
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from agent.arm import ArmClient
from agent.clock import Clock
from agent.config import Config
from agent.errors import (
    AgentError,
    DocumentError,
    ImdsError,
    ImdsRequestRejected,
    ImdsUnavailable,
    OperationCancelled,
)
from agent.events import ScheduledEvent, ScheduledEventsDocument
from agent.fleet import FleetGate
from agent.hooks import INTERRUPTED, HookContext, HookRunner, deadline_for, discover
from agent.imds import ImdsClient, InstanceMetadata
from agent.lifecycle import (
    ACTIVE,
    APPROVED,
    APPROVING,
    IGNORED,
    PREPARING,
    RECOVERING,
    WAITING,
    decide_approval,
    plan,
)
from agent.metrics import Metrics, type_label
from agent.selfservice import SelfService, is_self_service
from agent.state import Store
from agent.systemd import Notifier

POLL_BUDGET_SECONDS = 5.0
HEARTBEAT_SECONDS = 60.0


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
    arm: ArmClient | None = None
    instance: InstanceMetadata | None = None
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
    arm: ArmClient | None = None,
    instance: InstanceMetadata | None = None,
    fleet: FleetGate | None = None,
) -> Collaborators:
    """The daemon's parts for ``config``, on ``clock``, with a hook runner set from it."""
    hooks = HookRunner(
        clock,
        stop,
        log,
        kill_grace_seconds=config.hooks.kill_grace_seconds,
        tempfail_retry_seconds=config.hooks.tempfail_retry_seconds,
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
        arm=arm,
        instance=instance,
        fleet=fleet,
    )


class Daemon:
    def __init__(self, parts: Collaborators) -> None:
        self._parts = parts
        self._config = parts.config
        self._store = parts.store
        self._clock = parts.clock
        self._stop = parts.stop
        self._log = parts.log.bind(vm_name=parts.vm_name)
        self._latest: ScheduledEventsDocument | None = None
        self._handled: ScheduledEventsDocument | None = None
        self._resumed = False
        self._gone: set[str] = set()
        self._workers: dict[str, threading.Thread] = {}
        self._wakeups: dict[str, int] = {}
        self._workers_lock = threading.Lock()
        self._last_failure: str | None = None
        self._last_heartbeat = float("-inf")
        self._metrics = parts.metrics if parts.metrics is not None else Metrics(CollectorRegistry())
        self._notifier = parts.notifier if parts.notifier is not None else Notifier({})
        self._last_success: float | None = None
        self._ready = False
        self._degraded_reported = False
        self._redeploy_for: dict[str, str] = {}  # Redeploy event key -> self-service key
        self._fleet = parts.fleet
        self._once = False
        self.self_service: SelfService | None = None
        if parts.arm is not None and parts.instance is not None:
            self.self_service = SelfService(
                config=parts.config,
                arm=parts.arm,
                instance=parts.instance,
                store=parts.store,
                metrics=self._metrics,
                clock=parts.clock,
                stop=parts.stop,
                log=self._log,
                dry_run=parts.dry_run,
                fleet=parts.fleet,
                run_prepare=lambda event: self._run_phase("prepare", event),
                recover=lambda key: self._ensure_worker(key, gone=True),
            )

    # The loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Poll every interval until stopped; then let running work finish its grace."""
        self._log.info(
            "agent.started",
            imds_url=self._config.imds.url,
            dry_run=self._parts.dry_run,
            poll_interval_seconds=self._config.imds.poll_interval_seconds,
        )
        interval = self._config.imds.poll_interval_seconds
        watcher = None
        if self._fleet is not None:
            # In a thread of its own: a slow coordinator never delays the first poll.
            threading.Thread(
                target=self._fleet.run, args=(self._fleet_needed(),), name="fleet", daemon=True
            ).start()
        if self.self_service is not None:
            # Before the watcher may take a new one: wind up one a restart cut short.
            self.self_service.resume()
        if self.self_service is not None and self._config.maintenance.check_interval_seconds > 0:
            watcher = threading.Thread(
                target=self.self_service.run, name="maintenance", daemon=True
            )
            watcher.start()
        while not self._stop.is_set():
            started = self._clock.monotonic()
            self.poll()
            self._notifier.watchdog()
            if self._notifier.enabled:  # no summary to build on every poll for nobody
                self._notifier.status(self.summary())
            self._clock.wait(interval - (self._clock.monotonic() - started))
        self._notifier.stopping()
        if watcher is not None:
            watcher.join(timeout=60)
        self._join_workers()
        self._log.info("agent.stopped")
        return 0

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
        """One poll, handled fully: every worker it starts runs to its end."""
        self._once = True  # no waiting for a fleet slot: the next run tries again
        if self._fleet is not None:
            self._fleet.resume(self._fleet_needed())
        if self.self_service is not None:
            self.self_service.resume()
        ok = self.poll(budget_seconds=10.0)
        if self.self_service is not None and self._config.maintenance.check_interval_seconds > 0:
            self.self_service.check()
        self._join_workers()
        return 0 if ok else 1

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
            self._handle(document)
            self._handled = document
            self._refresh_gauges()
        self._last_success = self._clock.monotonic()
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

    def _refresh_gauges(self) -> None:
        """Set the gauges that describe this VM's events in the newest document."""
        latest = self._latest
        if latest is None:
            return
        mine = latest.affecting(self._parts.vm_name)
        approved = []
        prepare_failed = 0
        for event in mine:
            if self._store.approval_may_have_landed(event.key):
                approved.append(event.key)
            runs = self._store.hook_runs(event.key, "prepare")
            if any(run.outcome not in (None, "succeeded", "interrupted") for run in runs):
                prepare_failed += 1
        self._metrics.document(latest.incarnation, mine, approved, prepare_failed)

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

    def _handle(self, document: ScheduledEventsDocument) -> None:
        now = self._clock.now()
        # Self-service maintenances are never in the IMDS document: they end another way.
        known = {
            key: value
            for key, value in self._store.known_unfinished().items()
            if not is_self_service(key)
        }
        changes = plan(document, known, self._parts.vm_name, self._config.events.types)
        for event, relevance in changes.discovered:
            if self._store.get(event.key) is not None:
                # Seen before and finished: an event is never worked twice.
                self._log.warning("event.reappeared", event_id=event.event_id)
                continue
            late = relevance.relevant and (
                event.status != "Scheduled"
                or (event.not_before is not None and event.not_before <= now)
            )
            self._metrics.seen(event, late=late)
            self._store.discover(
                event,
                relevant=relevance.relevant,
                reason=relevance.reason,
                document_incarnation=document.incarnation,
                now=now,
            )
            self._log.info(
                "event.discovered" if relevance.relevant else "event.ignored",
                event_id=event.event_id,
                event_type=event.event_type,
                status=event.status,
                not_before=event.not_before_text,
                resources=list(event.resources),
                reason=relevance.reason,
            )
            if relevance.relevant:
                self._ensure_worker(event.key)
                awaiting = self.self_service.awaiting_redeploy if self.self_service else None
                if awaiting is not None and event.event_type == "Redeploy":
                    # The Redeploy that follows our performMaintenance: when it leaves, the VM
                    # is back and the self-service maintenance is over.
                    self._redeploy_for[event.key] = awaiting
                    if self.self_service is not None:
                        self.self_service.awaiting_redeploy = None
        for event in changes.changed:
            self._store.update_event(event, document.incarnation, now)
            name = "event.started" if event.status == "Started" else "event.changed"
            self._log.info(name, event_id=event.event_id, status=event.status)
        for key in changes.gone:
            state, last = known[key]
            self._log.info("event.gone", event_id=last.event_id if last else key, state=state)
            if state == IGNORED:
                self._store.move(key, "gone", now)
            else:
                self._ensure_worker(key, gone=True)
            if key in self._redeploy_for:
                self._ensure_worker(self._redeploy_for.pop(key), gone=True)
        if not self._resumed:
            self._resumed = True
            for key, (state, _) in known.items():
                if state in ACTIVE:
                    self._ensure_worker(key)

    # Workers -------------------------------------------------------------------------------

    def _ensure_worker(self, key: str, *, gone: bool = False) -> None:
        with self._workers_lock:
            if gone:
                self._gone.add(key)
            # A running worker sees the wakeup before it finishes, and takes another step.
            self._wakeups[key] = self._wakeups.get(key, 0) + 1
            if key in self._workers:
                return
            worker = threading.Thread(target=self._work, args=(key,), name=f"event-{key[:8]}")
            self._workers[key] = worker
            worker.start()

    def _join_workers(self) -> None:
        while True:
            with self._workers_lock:
                workers = list(self._workers.values())
            if not workers:
                return
            for worker in workers:
                worker.join()

    def _work(self, key: str) -> None:
        try:
            while not self._stop.is_set():
                with self._workers_lock:
                    wakeups = self._wakeups.get(key, 0)
                if self._step(key):
                    continue
                with self._workers_lock:
                    if self._wakeups.get(key, 0) == wakeups:
                        self._workers.pop(key, None)
                        return
        except AgentError as error:
            self._log.error("event.work_failed", event_id=key, reason=str(error))
        finally:
            with self._workers_lock:
                self._workers.pop(key, None)

    def _step(self, key: str) -> bool:
        """Carry out the next step of one event; False when there is nothing more to do now."""
        record = self._store.get(key)
        if record is None:
            return False
        now = self._clock.now()
        gone = key in self._gone or record.gone_at is not None
        if record.state == PREPARING:
            if gone and not self._store.hook_runs(key, "prepare"):
                self._store.move(key, "gone_before_hooks", now)
                self._release_slot(key)
                self._log.info(
                    "event.done", event_id=record.event_id, reason="left before any hook ran"
                )
                return False
            succeeded = self._run_phase("prepare", record.event)
            if succeeded is None:
                return False
            return self._decide(record.event, succeeded, gone=key in self._gone)
        if record.state == APPROVING:
            if gone:
                return self._abandon(key, "event left the document", "skipped", "event_left")
            return self._approve(self._current(record.event))
        if record.state in (APPROVED, WAITING):
            if not gone:
                return False  # nothing to do until the event leaves
            self._store.move(key, "gone", now)
            return True
        if record.state == RECOVERING:
            succeeded = self._run_phase("recover", record.event)
            if succeeded is None:
                return False
            self._store.move(key, "recovered", self._clock.now())
            self._log.info(
                "event.recovered" if succeeded else "event.recover_failed",
                event_id=record.event_id,
            )
            self._release_slot(key)
            return False
        return False

    def _current(self, event: ScheduledEvent) -> ScheduledEvent:
        """The event's form in the newest document, or the stored one."""
        latest = self._latest
        found = latest.find(event.event_id) if latest is not None else None
        return found if found is not None else event

    def _decide(self, stored: ScheduledEvent, prepare_succeeded: bool, *, gone: bool) -> bool:
        event = self._current(stored)
        now = self._clock.now()
        approval = self._config.approval
        if gone:
            approve, reason, code = False, "event left the document", "event_left"
        else:
            decision = decide_approval(
                event,
                vm_name=self._parts.vm_name,
                mode=approval.mode,
                shared_events=approval.shared_events,
                prepare_succeeded=prepare_succeeded,
                now=now,
            )
            approve, reason, code = decision.approve, decision.reason, decision.code
        if not approve:
            self._metrics.approval("skipped", code)
            if code == "not_before_passed":
                self._metrics.events_late.labels(type=type_label(event.event_type)).inc()
        self._log.info(
            "event.approval_decision", event_id=event.event_id, approve=approve, reason=reason
        )
        self._failpoint("after-prepare")
        trigger = "prepared_approve" if approve else "prepared_no_approval"
        self._store.move(event.key, trigger, now, decision=reason)
        self._refresh_gauges()
        return True

    def _approve(self, event: ScheduledEvent) -> bool:
        now = self._clock.now()
        key = event.key
        if self._store.approval_may_have_landed(key):
            # A POST went out before a restart and was never recorded back: it may have
            # landed, and an event is never approved twice.
            self._log.warning("event.approval_not_repeated", event_id=event.event_id)
            return self._abandon(key, "approval sent before a restart", "skipped", "already_sent")
        if event.status != "Scheduled":
            return self._abandon(key, f"event is {event.status}", "skipped", "started")
        budget = (event.not_before - now).total_seconds() if event.not_before else 0.0
        if budget <= 0:
            return self._abandon(key, "NotBefore has passed", "skipped", "not_before_passed")
        if self._parts.dry_run:
            self._log.info("event.would_approve", event_id=event.event_id)
            return self._abandon(key, "dry run", "skipped", "dry_run")
        if self._fleet is not None and not self._fleet.hold(key, event.event_id):
            if self._once:
                return False  # left approving: the next run asks for a slot again
            # No slot (or no answer from the coordinator): no early approval now; ask again.
            self._clock.wait(min(self._fleet.retry_seconds, budget))
            return True
        approval_id = self._store.approval_started(key, "agent", now)
        try:
            self._parts.imds.approve([event.event_id], budget_seconds=budget)
        except OperationCancelled:
            self._store.approval_finished(approval_id, "interrupted", self._clock.now())
            return False
        except ImdsError as error:
            refused = isinstance(error, ImdsRequestRejected)
            outcome = "refused" if refused else "failed"
            self._store.approval_finished(approval_id, outcome, self._clock.now(), str(error))
            self._log.error("event.approval_failed", event_id=event.event_id, reason=str(error))
            return self._abandon(key, str(error), "failed", outcome if refused else "unavailable")
        self._failpoint("after-approval")
        landed = self._clock.now()
        self._store.approval_finished(approval_id, "succeeded", landed)
        self._store.move(key, "approval_succeeded", landed)
        lead = (event.not_before - landed).total_seconds() if event.not_before else None
        self._metrics.approval("succeeded", "posted", lead)
        self._refresh_gauges()
        self._log.info("event.approved", event_id=event.event_id, lead_seconds=lead)
        return True

    def _abandon(self, key: str, reason: str, outcome: str, code: str) -> bool:
        """No approval for this event after all: record why, and count it."""
        if self._fleet is not None and self._fleet.waiting(key):
            missed = code in ("not_before_passed", "started")
            self._fleet.stop_waiting(key, missed=missed)
            if missed:
                reason, code = f"no fleet slot before the event began ({reason})", "no_fleet_slot"
        self._store.move(key, "approval_abandoned", self._clock.now(), decision=reason)
        self._metrics.approval(outcome, code)
        return True

    def _release_slot(self, key: str) -> None:
        """The event is over and recovered: its hold on the fleet slot ends."""
        if self._fleet is not None:
            self._fleet.release(key)

    def _run_phase(self, phase: str, stored: ScheduledEvent) -> bool | None:
        """Run a phase's hooks in order, skipping those that already succeeded for this event.

        True when all succeeded (no hooks counts), False at the first failure, None if stopped.
        """
        hooks_config = self._config.hooks
        directory = Path(
            hooks_config.prepare_dir if phase == "prepare" else hooks_config.recover_dir
        )
        hooks = discover(directory, check_ownership=self._parts.check_ownership, log=self._log)
        done = self._store.succeeded_hooks(stored.key, phase)
        self._failpoint(f"before-{phase}-hooks")
        for hook in hooks:
            if hook.name in done:
                continue
            if self._stop.is_set():
                return None
            if phase == "prepare" and stored.key in self._gone:
                self._log.info(
                    "event.prepare_cut_short", event_id=stored.event_id, next_hook=hook.name
                )
                return False
            event = self._current(stored)
            now = self._clock.now()
            deadline = deadline_for(phase, event, now, hooks_config.timeout_seconds)
            if self._parts.dry_run:
                self._log.info(
                    "hook.would_run", hook=hook.name, phase=phase, event_id=event.event_id
                )
                continue
            incarnation = self._latest.incarnation if self._latest is not None else 0
            run_id = self._store.hook_started(stored.key, phase, hook.name, now, deadline)
            result = self._parts.hooks.run(
                hook, HookContext(phase, event, self._parts.vm_name, incarnation, deadline)
            )
            self._store.hook_finished(run_id, result)
            self._metrics.hook_run(
                phase, result.outcome, (result.ended_at - result.started_at).total_seconds()
            )
            if result.outcome == INTERRUPTED:
                return None
            if not result.succeeded:
                return False
        return True

    def _failpoint(self, name: str) -> None:
        """Testing aid: die here, as ``kill -9`` would, when asked to (see tests/test_crash.py)."""
        if name in self._parts.failpoints:
            os.kill(os.getpid(), signal.SIGKILL)
