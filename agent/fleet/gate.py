"""The gate: this agent's side of the group."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from agent.clock import Clock
from agent.config import FleetConfig
from agent.fleet.backend import Attempt, Backend, FleetError
from agent.metrics import Metrics
from agent.state import Store

TICK_SECONDS = 1.0
_T = TypeVar("_T")


class FleetGate:
    """This agent's side of the group: which of its events need the slot, and whether it has it."""

    def __init__(
        self,
        backend: Backend,
        *,
        config: FleetConfig,
        store: Store,
        metrics: Metrics,
        clock: Clock,
        stop: threading.Event,
        log: Any,
    ) -> None:
        self._backend = backend
        self._config = config
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._stop = stop
        self._log = log.bind(fleet_group=config.group, fleet_backend=backend.name)
        self._lock = threading.RLock()
        self._slot: str | None = None
        self._since: str | None = None
        self._renewed_at = float("-inf")
        self._holding: dict[str, str] = {}  # event key -> event id
        self._waiting: dict[str, float] = {}  # event key -> when it began to wait (monotonic)
        self._told_waiting: set[str] = set()
        self._release_pending = False
        self._problem: str | None = None
        self._problem_reason: str | None = None
        self._refusal: str | None = None

    @property
    def retry_seconds(self) -> float:
        return self._config.retry_seconds

    def held(self) -> bool:
        with self._lock:
            return self._slot is not None and self._fresh()

    def holds(self, key: str) -> bool:
        """True when ``key`` already holds this agent's slot."""
        key = key.lower()  # event keys, as the state store writes them
        with self._lock:
            return key in self._holding and self._slot is not None

    def waiting(self, key: str) -> bool:
        key = key.lower()  # event keys, as the state store writes them
        with self._lock:
            return key in self._waiting

    def hold(self, key: str, event_id: str) -> bool:
        """True when this agent holds a slot for ``key`` (taking one if it can); never waits."""
        key = key.lower()  # event keys, as the state store writes them
        with self._lock:
            started = self._waiting.setdefault(key, self._clock.monotonic())
            if self._slot is not None and not self._fresh():
                self._renew()
            if self._slot is None:
                since = self._clock.now().isoformat(timespec="seconds")
                attempt = self._call(lambda: self._backend.acquire(event_id, since))
                if attempt is None or attempt.slot is None:
                    self._tell_waiting(key, event_id, attempt)
                    return False
                self._slot, self._since = attempt.slot, since
                self._release_pending = False  # whatever was left from before, this is ours
                self._renewed_at = self._clock.monotonic()
                self._metrics.fleet_slot_held.set(1)
                self._log.info("fleet.slot_taken", slot=attempt.slot, event_id=event_id)
            elif not self._fresh():
                return False  # held, but not renewed in time: not for new approvals
            waited = self._clock.monotonic() - started
            if key not in self._holding:
                self._metrics.fleet_slot_wait.observe(waited)
                self._holding[key] = event_id
                self._log.info(
                    "fleet.slot_held_for",
                    slot=self._slot,
                    event_id=event_id,
                    waited_seconds=round(waited, 1),
                )
            self._waiting.pop(key, None)
            self._told_waiting.discard(key)
            self._record()
            return True

    def stop_waiting(self, key: str, *, missed: bool) -> None:
        """``key`` no longer waits for a slot (it started, NotBefore passed, or it left)."""
        key = key.lower()  # event keys, as the state store writes them
        with self._lock:
            started = self._waiting.pop(key, None)
            self._told_waiting.discard(key)
            if started is None:
                return
            waited = self._clock.monotonic() - started
            self._metrics.fleet_slot_wait.observe(waited)
            if missed:
                self._metrics.fleet_slot_missed.inc()
                self._log.warning(
                    "fleet.slot_missed",
                    event_id=key,
                    waited_seconds=round(waited, 1),
                    consequence="no early approval: Azure acts at NotBefore",
                )

    def release(self, key: str) -> None:
        """``key`` is over (and recovered): give the slot back once no event holds it."""
        key = key.lower()  # event keys, as the state store writes them
        with self._lock:
            self.stop_waiting(key, missed=False)
            if self._holding.pop(key, None) is None or self._holding or self._slot is None:
                return
            slot, self._slot, self._since = self._slot, None, None
            self._metrics.fleet_slot_held.set(0)
            self._log.info("fleet.slot_released", slot=slot, event_id=key)
            self._release_pending = True
            self._give_back(slot)
            self._record()

    def resume(self, needed: Mapping[str, str]) -> None:
        """At start-up: keep (take again) a slot for events that were approved before the
        restart and are not over; else give back whatever this agent may still hold."""
        with self._lock:
            for key, event_id in needed.items():
                self.hold(key, event_id)
                self._waiting.pop(key, None)
            if not needed and self._slot is None:  # (a slot taken already is this run's own)
                self._release_pending = True
                self._give_back(None)
            self._record()

    def tick(self) -> None:
        """Renew a held lease when due, and retry a release that failed."""
        with self._lock:
            lease = self._backend.lease_seconds
            if (
                self._slot is not None
                and lease is not None
                and self._clock.monotonic() - self._renewed_at >= lease / 3
            ):
                self._renew()
            if self._release_pending and self._slot is None:
                self._give_back(None)

    def close(self) -> None:
        self._backend.close()

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "backend": self._backend.name,
                "group": self._config.group,
                "slots": self._backend.slots,
                "slot": self._slot,
                "since": self._since,
                "events": sorted(self._holding.values()),
                "waiting": sorted(self._waiting),
                "problem": self._problem,
            }

    # Inside the lock ----------------------------------------------------------------------------

    def _fresh(self) -> bool:
        lease = self._backend.lease_seconds
        return lease is None or self._clock.monotonic() - self._renewed_at < lease - 2

    def _renew(self) -> None:
        slot = self._slot
        if slot is None:
            return
        started = self._clock.monotonic()
        renewed = self._call(lambda: self._backend.renew(slot))
        if renewed:
            self._renewed_at = started
        elif renewed is not None:
            self._metrics.fleet_errors.labels(backend=self._backend.name, reason="lost").inc()
            self._log.error(
                "fleet.slot_lost",
                slot=slot,
                events=sorted(self._holding.values()),
                reason="the lease could not be renewed: another agent holds the slot now",
            )
            self._slot = None
            self._metrics.fleet_slot_held.set(0)
            self._record()

    def _give_back(self, slot: str | None) -> None:
        def give_back() -> bool:
            self._backend.release(slot)
            return True

        if self._call(give_back):
            self._release_pending = False

    def _call(self, action: Callable[[], _T]) -> _T | None:
        """Run one coordinator call; None when it failed (logged once per change, counted)."""
        try:
            result = action()
        except FleetError as error:
            self._metrics.fleet_errors.labels(backend=self._backend.name, reason=error.reason).inc()
            # Once per change of cause: the wording differs between calls, the cause does not.
            if error.reason != self._problem_reason:
                self._problem_reason = error.reason
                self._problem = str(error)
                self._log.error(
                    "fleet.unavailable",
                    reason=str(error),
                    consequence="no early approval until the coordinator answers; "
                    "hooks still run and Azure acts at NotBefore",
                )
                self._record()
            return None
        if self._problem is not None:
            self._log.info("fleet.available", after=self._problem)
            self._problem = self._problem_reason = None
            self._record()
        return result

    def _tell_waiting(self, key: str, event_id: str, attempt: Attempt | None) -> None:
        detail = attempt.detail if attempt is not None else self._problem or ""
        if key not in self._told_waiting or (attempt is not None and detail != self._refusal):
            self._told_waiting.add(key)
            self._refusal = detail
            self._log.info(
                "fleet.waiting_for_slot",
                event_id=event_id,
                detail=detail,
                consequence="no early approval until a slot is free",
            )

    def _record(self) -> None:
        self._store.set_meta(
            fleet=json.dumps(
                {**self.describe(), "recorded_at": self._clock.now().isoformat(timespec="seconds")}
            )
        )
