"""Self-service maintenance, the acting part: read the windows every check interval, show them,
and, when configured, take the maintenance in this VM's slot (docs/AZURE.md section 6).

Invariants:
- The windows are read at start-up and every ``maintenance.check_interval_seconds``; a change
  is logged once; errors are logged once per change, with cause and fix; a 429's Retry-After
  sets the next check.
- A maintenance is taken at most once per window, whatever restarts happen: its synthetic event
  ``self-service:<vmId>:<window start>`` is recorded in the state store before anything is done,
  and a recorded one is never taken again.
- Taking it: the prepare hooks (type PerformMaintenance), then ``performMaintenance``, followed
  to its end. The Redeploy event that follows is an ordinary event: prepared and approved by the
  usual rules. Recover hooks run for the synthetic event once the VM is back: when that Redeploy
  has left the document, when the operation failed, or after a restart (the VM was redeployed).
- ``--dry-run`` calls nothing and runs nothing; it logs what it would do.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import Any
from zoneinfo import ZoneInfo

from agent.arm import ArmClient, ArmError, MaintenanceStatus
from agent.clock import Clock
from agent.config import Config
from agent.events import ScheduledEvent
from agent.fleet import FleetGate
from agent.imds import InstanceMetadata
from agent.lifecycle import PREPARING, RECOVERING, WAITING
from agent.maintenance import Slot, decide, parse_iso, window_key
from agent.metrics import Metrics
from agent.state import Store

SELF_SERVICE_TYPE = "PerformMaintenance"
PREFIX = "self-service:"
FINAL = ("Succeeded", "Failed", "Canceled")


def is_self_service(key: str) -> bool:
    return key.startswith(PREFIX)


# A performMaintenance that ARM still says is InProgress after this long is given up on (it
# redeploys the VM: minutes, not hours), so the watcher never follows it for ever.
OPERATION_BUDGET_SECONDS = 3600.0


class SelfService:
    def __init__(
        self,
        *,
        config: Config,
        arm: ArmClient,
        instance: InstanceMetadata,
        store: Store,
        metrics: Metrics,
        clock: Clock,
        stop: threading.Event,
        log: Any,
        dry_run: bool,
        fleet: FleetGate | None = None,
    ) -> None:
        self._config = config.maintenance
        self._arm = arm
        self._instance = instance
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._stop = stop
        self._log = log
        self._dry_run = dry_run
        self._fleet = fleet
        self._run_prepare: Callable[[ScheduledEvent], bool | None] | None = None
        self._recover: Callable[[str], None] | None = None
        settings = self._config.self_service
        self._slots = tuple(Slot.parse(slot) for slot in settings.slots)
        self._zone = ZoneInfo(settings.time_zone)
        domain = instance.platform_update_domain
        # ASCII digits only, and few: '\u00b2' passes isdigit() and int() refuses it.
        readable = domain.isascii() and domain.isdigit() and len(domain) <= 6
        self._update_domain = int(domain) if readable else 0
        self._last_status: MaintenanceStatus | None = None
        self._last_error: str | None = None
        self._checked = False
        self._awaiting_lock = threading.Lock()
        self._awaiting_redeploy: str | None = None  # the synthetic key whose Redeploy is due

    def attach(
        self,
        *,
        run_prepare: Callable[[ScheduledEvent], bool | None],
        over: Callable[[str], None],
    ) -> None:
        """Connect to the daemon: how to run prepare hooks, and how to say a maintenance is
        over (its recover hooks are due)."""
        self._run_prepare = run_prepare
        self._recover = over

    def take_awaiting_redeploy(self) -> str | None:
        """The maintenance whose Redeploy is due, once: the caller now follows that Redeploy."""
        with self._awaiting_lock:
            key, self._awaiting_redeploy = self._awaiting_redeploy, None
            return key

    def _await_redeploy(self, key: str | None) -> None:
        with self._awaiting_lock:
            self._awaiting_redeploy = key

    def check(self) -> float:
        """Read the windows and act on them; the seconds until the next check."""
        interval = self._config.check_interval_seconds
        try:
            status = self._arm.instance_view(self._instance.resource_id)
        except ArmError as error:
            if str(error.cause) != self._last_error:
                self._log.error("maintenance.check_failed", cause=error.cause, reason=str(error))
                self._last_error = str(error.cause)
            self._metrics.maintenance_errors.labels(cause=error.cause).inc()
            return error.retry_after if error.retry_after is not None else interval
        if self._last_error is not None:
            self._log.info("maintenance.check_recovered", after=self._last_error)
            self._last_error = None
        if status != self._last_status or not self._checked:
            self._checked = True
            self._last_status = status
            self._log.info(
                "maintenance.windows",
                **(asdict(status) if status else {"planned": False}),
            )
            self._store.set_meta(
                maintenance=json.dumps(asdict(status) if status else None),
                maintenance_checked_at=self._clock.now().isoformat(timespec="seconds"),
            )
        self._metrics.maintenance(status)
        settings = self._config.self_service
        if settings.enabled and status is not None:
            verdict = decide(
                status,
                now=self._clock.now(),
                slots=self._slots,
                zone=self._zone,
                update_domain=self._update_domain,
                spacing_minutes=settings.update_domain_spacing_minutes,
            )
            key = window_key(self._instance.vm_id, status)
            if verdict.go and self._store.get(key) is None:
                if self._fleet is not None and not self._fleet.hold(key, key):
                    # Not without a slot of the group: ask again soon (the gate logs why).
                    return min(interval, self._fleet.retry_seconds)
                self.take(key, status, verdict.reason)
            elif self._fleet is not None and self._fleet.waiting(key):
                self._fleet.stop_waiting(key, missed=False)  # the slot closed, or it was taken
        return interval

    def take(self, key: str, status: MaintenanceStatus, reason: str) -> None:
        now = self._clock.now()
        not_before = parse_iso(status.scheduled_start)
        event = ScheduledEvent(
            event_id=key,
            event_type=SELF_SERVICE_TYPE,
            status="Scheduled",
            resources=(self._instance.name,),
            not_before=not_before,
            # Stored in one form, whichever ARM wrote: the record reads back as any event does.
            not_before_text=None if not_before is None else f"{not_before:%Y-%m-%dT%H:%M:%SZ}",
            description="Self-service maintenance taken in a configured slot.",
            source="User",
        )
        # Recorded before anything is done: never twice in one window, whatever restarts.
        self._store.discover(event, relevant=True, reason=reason, document_incarnation=0, now=now)
        self._log.info("maintenance.self_service_starting", event_id=key, reason=reason)
        if self._dry_run:
            self._log.info("maintenance.would_perform", event_id=key)
            self._store.move(key, "prepared_no_approval", now, decision="dry run")
            return
        if self._run_prepare is None or self._recover is None:
            raise RuntimeError("SelfService.attach() was not called")
        prepared = self._run_prepare(event)
        if prepared is None:
            return  # stopping: resumed after the restart
        if not prepared:
            self._finish(key, "prepare hooks failed: maintenance not started", recover_now=True)
            return
        # Set before the call: the Redeploy that follows may show up before the call returns.
        self._await_redeploy(key)
        outcome = self._perform()
        if outcome != "Succeeded":
            self._await_redeploy(None)
        self._finish(key, f"performMaintenance {outcome}", recover_now=outcome != "Succeeded")

    def _perform(self) -> str:
        try:
            operation = self._arm.perform_maintenance(self._instance.resource_id)
            deadline = self._clock.monotonic() + OPERATION_BUDGET_SECONDS
            while operation is not None and not self._stop.is_set():
                state = self._arm.operation_status(operation)
                if state in FINAL:
                    return state
                if self._clock.monotonic() >= deadline:
                    raise ArmError(
                        f"arm: the operation {operation} did not end within "
                        f"{OPERATION_BUDGET_SECONDS:g} s",
                        cause="operation_timeout",
                    )
                self._clock.wait(1.0)
        except ArmError as error:
            self._log.error("maintenance.perform_failed", cause=error.cause, reason=str(error))
            return f"refused: {error}"
        return "Succeeded" if not self._stop.is_set() else "interrupted"

    def _finish(self, key: str, decision: str, *, recover_now: bool) -> None:
        now = self._clock.now()
        self._store.move(key, "prepared_no_approval", now, decision=decision)
        self._log.info("maintenance.self_service_finished", event_id=key, outcome=decision)
        self._metrics.self_service_runs.labels(
            outcome="succeeded" if decision.endswith("Succeeded") else "failed"
        ).inc()
        if recover_now and self._recover is not None:
            self._recover(key)

    def resume(self) -> None:
        """After a restart: a maintenance that was performed redeployed the VM, which is back;
        one cut short by the restart is wound up. Either way its recover hooks run."""
        states = frozenset({PREPARING, WAITING, RECOVERING})
        for record in self._store.events(states=states):
            if is_self_service(record.key) and self._recover is not None:
                self._recover(record.key)
