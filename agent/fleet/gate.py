"""The gate: this agent's side of the group.

Invariants:
- Only ``tick`` talks to the coordinator, and never under the gate's lock. In the daemon, the
  gate's own thread calls it; workers only say what they want (``hold``, ``release``) and read
  the gate's state, so none of them ever waits on the network. Without a thread (``run --once``,
  tests), ``hold`` calls ``tick`` itself.
- A slot is taken for the events that want it, with a marker that says what it is held for. For
  an event after which the VM comes back (all but Terminate and Preempt), the marker keeps the
  slot this VM's for ``fleet.max_down_seconds`` after its last sign of life, even when the lease
  lapses while the VM is down for that maintenance. ``hold`` says yes only once the marker that
  covers the event is written.
- When the last event is over (recover hooks run), the marker is cleared at once and the slot
  kept ``fleet.settle_seconds`` more, then given back.
- A slot this agent may hold by its own records (events approved before a restart; an acquire
  whose answer was lost) is given back once no event wants it, retried until the coordinator
  answers.
- Fail safe: a coordinator that fails or refuses means no slot, so no early approval.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from agent.clock import Clock
from agent.config import FleetConfig
from agent.fleet.backend import Attempt, Backend, FleetError, Holding
from agent.metrics import Metrics
from agent.state import Store

TICK_SECONDS = 1.0
# Events after which the VM is not back as it was: their slot is not held through the outage.
GONE_FOR_GOOD = ("Terminate", "Preempt")


@dataclass
class _Want:
    event_id: str
    comes_back: bool
    since: float  # monotonic: when it began to wait
    resumed: bool = False  # approved before a restart: not a new wait
    not_before: datetime | None = None  # its deadline: the earliest goes first


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
        self._wake = threading.Event()
        self._ticking = threading.Lock()
        self._threaded = False
        self.on_change: Callable[[list[str]], None] = lambda keys: None
        self._slot: str | None = None
        self._since: str | None = None
        self._renewed_at = float("-inf")
        self._marked: Holding | None = None  # the marker last written for the held slot
        self._holding: dict[str, _Want] = {}  # event key -> what holds the slot
        self._waiting: dict[str, _Want] = {}  # event key -> what waits for it
        self._told_waiting: set[str] = set()
        self._settle_until: float | None = None  # monotonic: give the idle slot back then
        self._may_hold = False  # a slot may be ours at the coordinator: give it back when idle
        self._next_try = float("-inf")  # monotonic: the next acquire or give-back attempt
        self._problem: str | None = None
        self._problem_reason: str | None = None
        self._refusal: str | None = None

    @property
    def retry_seconds(self) -> float:
        return self._config.retry_seconds

    def use_own_thread(self) -> None:
        """From now on only the gate's thread (calling ``tick``) talks to the coordinator."""
        self._threaded = True

    def wait(self, seconds: float) -> None:
        """The gate's thread: wait until the next tick is due, or a worker wants something."""
        self._wake.wait(seconds)
        self._wake.clear()

    # What workers call: no network ----------------------------------------------------------

    def held(self) -> bool:
        with self._lock:
            return self._slot is not None and self._fresh()

    def holds(self, key: str) -> bool:
        """True when ``key`` already holds this agent's slot."""
        key = key.lower()  # event keys, as the state store writes them
        with self._lock:
            return key in self._holding and self._slot is not None

    def granted(self, key: str) -> bool:
        """True while ``key`` may be approved early: its slot is fresh and marked for it. Asked
        again before every try of an approval's POST."""
        with self._lock:
            return self._granted(key.lower())

    def waiting(self, key: str) -> bool:
        key = key.lower()
        with self._lock:
            return key in self._waiting

    def hold(
        self,
        key: str,
        event_id: str,
        *,
        event_type: str | None = None,
        not_before: datetime | None = None,
    ) -> bool:
        """True when this agent holds a fresh slot for ``key``, its marker written; else
        ``key`` waits for one (the gate's thread wakes its worker through ``on_change``)."""
        key = key.lower()
        with self._lock:
            if self._granted(key):
                return True
            if key not in self._waiting:
                self._waiting[key] = _Want(
                    event_id,
                    event_type not in GONE_FOR_GOOD,
                    self._clock.monotonic(),
                    not_before=not_before,
                )
                self._next_try = float("-inf")  # a new want: ask at once
            self._settle_until = None  # wanted again: the slot is not given back
        if not self._threaded:
            self.tick()
            with self._lock:
                return self._granted(key)
        self._wake.set()
        return False

    def stop_waiting(self, key: str, *, missed: bool) -> None:
        """``key`` no longer waits for a slot (it started, NotBefore passed, or it left)."""
        key = key.lower()
        with self._lock:
            want = self._waiting.pop(key, None)
            self._told_waiting.discard(key)
            if want is None or want.resumed:
                return
            waited = self._clock.monotonic() - want.since
            self._metrics.fleet_slot_wait.observe(waited)
            if missed:
                self._metrics.fleet_slot_missed.inc()
                self._log.warning(
                    "fleet.slot_missed",
                    event_id=want.event_id,
                    waited_seconds=round(waited, 1),
                    consequence="no early approval: Azure acts at NotBefore",
                )
            self._after_change()

    def release(self, key: str) -> None:
        """``key`` is over (and recovered): the slot goes back once no event holds or wants it,
        after ``fleet.settle_seconds``."""
        key = key.lower()
        with self._lock:
            self.stop_waiting(key, missed=False)
            if self._holding.pop(key, None) is not None:
                self._log.info("fleet.event_over", slot=self._slot, event_id=key)
            self._after_change()
        if not self._threaded:
            self.tick()
        self._wake.set()

    def resume(self, needed: Mapping[str, str]) -> None:
        """At start-up: take the slot again for the events approved before the restart and
        not over; give back whatever this agent may still hold once none is left."""
        with self._lock:
            for key, event_id in needed.items():
                self._waiting[key.lower()] = _Want(
                    event_id, True, self._clock.monotonic(), resumed=True
                )
            self._may_hold = True
            self._next_try = float("-inf")
            self._record()
        if not self._threaded:
            self.tick()
        self._wake.set()

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "backend": self._backend.name,
                "group": self._config.group,
                "slots": self._backend.slots,
                "slot": self._slot,
                "since": self._since,
                "events": sorted(want.event_id for want in self._holding.values()),
                "waiting": sorted(self._waiting),
                "down_seconds": self._marked.down_seconds if self._marked else 0,
                "settling": self._settle_until is not None,
                "problem": self._problem,
            }

    def close(self) -> None:
        self._backend.close()

    # The gate's thread ------------------------------------------------------------------------

    def tick(self) -> None:
        """Talk to the coordinator as the state asks: take a slot for waiting events (or mark the
        held one for them), renew it when due, give it back when idle."""
        with self._ticking:  # one at a time (without a thread, workers tick for themselves)
            self._take_or_mark()
            self._renew_when_due()
            self._leave_queue_when_not_waiting()
            self._give_back_when_idle()

    def _leave_queue_when_not_waiting(self) -> None:
        with self._lock:
            if self._waiting:
                return
        try:
            self._backend.leave_queue()
        except FleetError as error:
            with self._lock:
                self._failed(error)

    def _take_or_mark(self) -> None:
        with self._lock:
            if not self._waiting:
                return
            if self._slot is None and self._clock.monotonic() < self._next_try:
                return
            slot, wanted = self._slot, dict(self._waiting)
            holding = self._holding_for({**self._holding, **wanted})
        try:
            if slot is None:
                self._take(wanted, holding)
            else:
                self._mark(slot, wanted, holding)
        except FleetError as error:
            with self._lock:
                self._failed(error)
                self._next_try = self._clock.monotonic() + self._config.retry_seconds
                self._may_hold = True  # the request may have landed before its answer was lost
                self._tell_all_waiting(wanted, None)
        self.on_change(sorted(wanted))

    def _take(self, wanted: Mapping[str, _Want], holding: Holding) -> None:
        deadlines = [want.not_before for want in wanted.values() if want.not_before is not None]
        first = (
            min(deadlines).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            if deadlines
            else None
        )
        attempt = self._backend.acquire(holding, not_before=first)  # leaves the line if taken
        with self._lock:
            self._answered()
            self._next_try = self._clock.monotonic() + self._config.retry_seconds
            if attempt.slot is None:
                self._tell_all_waiting(wanted, attempt)
                return
            self._slot, self._since = attempt.slot, holding.since
            self._may_hold = True
            if attempt.took_over is not None:
                self._log.warning(
                    "fleet.down_holder_expired",
                    slot=attempt.slot,
                    previous=attempt.took_over,
                    consequence="its time down ran out: the slot is taken over",
                )
            self._log.info("fleet.slot_taken", slot=attempt.slot, events=list(holding.events))
            self._granted_now(wanted, holding)

    def _mark(self, slot: str, wanted: Mapping[str, _Want], holding: Holding) -> None:
        """The slot is held already: write the marker that covers the new events too."""
        renewed = self._backend.renew(slot, holding)
        with self._lock:
            self._answered()
            if self._slot != slot:
                return
            if renewed:
                self._granted_now(wanted, holding)
            else:
                self._lost(slot)

    def _renew_when_due(self) -> None:
        with self._lock:
            slot, lease = self._slot, self._backend.lease_seconds
            if slot is None or lease is None:
                return
            if self._clock.monotonic() - self._renewed_at < lease / 3:
                return
            holding = self._holding_for(self._holding)
            started = self._clock.monotonic()
        try:
            renewed = self._backend.renew(slot, holding)
        except FleetError as error:
            with self._lock:
                self._failed(error)
            return
        with self._lock:
            self._answered()
            if self._slot != slot:
                return
            if renewed:
                self._renewed_at, self._marked = started, holding
            else:
                self._lost(slot)

    def _give_back_when_idle(self) -> None:
        with self._lock:
            if self._holding or self._waiting:
                return
            slot, now = self._slot, self._clock.monotonic()
            if slot is not None and self._settle_until is not None and now < self._settle_until:
                # Settling: the slot is kept (and renewed), but no longer held through a
                # maintenance, since none is under way.
                if self._marked is None or self._marked.down_seconds == 0:
                    return
                holding: Holding | None = self._holding_for({})
            elif (slot is None and not self._may_hold) or now < self._next_try:
                return
            else:
                holding = None
        try:
            if holding is not None:
                assert slot is not None
                if self._backend.renew(slot, holding):
                    with self._lock:
                        self._answered()
                        self._marked = holding
                return
            self._backend.release(slot)
        except FleetError as error:
            with self._lock:
                self._failed(error)
                self._next_try = self._clock.monotonic() + self._config.retry_seconds
            return
        with self._lock:
            self._answered()
            if self._slot is not None:
                self._log.info("fleet.slot_released", slot=self._slot)
            # Given back at the coordinator: an event that asked meanwhile takes a slot anew.
            self._slot = self._since = self._marked = None
            self._settle_until = None
            self._may_hold = False
            self._metrics.fleet_slot_held.set(0)
            self._record()

    # Inside the lock ----------------------------------------------------------------------------

    def _granted(self, key: str) -> bool:
        """``key`` holds a fresh slot, and the marker last written names its event."""
        want = self._holding.get(key)
        if want is None or self._slot is None or not self._fresh():
            return False
        return self._marked is not None and want.event_id in self._marked.events

    def _granted_now(self, wanted: Mapping[str, _Want], holding: Holding) -> None:
        self._renewed_at = self._clock.monotonic()
        self._marked = holding
        self._metrics.fleet_slot_held.set(1)
        for key, want in wanted.items():
            if self._waiting.get(key) is not want:
                continue  # it stopped waiting meanwhile
            del self._waiting[key]
            self._told_waiting.discard(key)
            self._holding[key] = want
            waited = self._clock.monotonic() - want.since
            if not want.resumed:
                self._metrics.fleet_slot_wait.observe(waited)
            self._log.info(
                "fleet.slot_held_for",
                slot=self._slot,
                event_id=want.event_id,
                waited_seconds=round(waited, 1),
                down_seconds=holding.down_seconds,
            )
        self._record()

    def _holding_for(self, wants: Mapping[str, _Want]) -> Holding:
        comes_back = any(want.comes_back for want in wants.values())
        return Holding(
            events=tuple(sorted(want.event_id for want in wants.values())),
            since=self._since or self._clock.now().isoformat(timespec="seconds"),
            down_seconds=self._config.max_down_seconds if comes_back else 0,
        )

    def _after_change(self) -> None:
        """An event stopped holding or waiting: start the settle time when none is left."""
        idle = self._slot is not None and not self._holding and not self._waiting
        if idle and self._settle_until is None:
            self._settle_until = self._clock.monotonic() + self._config.settle_seconds
        self._record()

    def _tell_all_waiting(self, wanted: Mapping[str, _Want], attempt: Attempt | None) -> None:
        for key, want in wanted.items():
            if key in self._waiting:
                self._tell_waiting(key, want.event_id, attempt)

    def _lost(self, slot: str) -> None:
        self._metrics.fleet_errors.labels(backend=self._backend.name, reason="lost").inc()
        self._log.error(
            "fleet.slot_lost",
            slot=slot,
            events=sorted(want.event_id for want in self._holding.values()),
            reason="the lease could not be renewed: another agent holds the slot now",
        )
        # The events that held it wait again: no new approval without a slot.
        for key, want in self._holding.items():
            self._waiting.setdefault(key, want)
        self._holding.clear()
        self._slot = self._since = self._marked = None
        self._metrics.fleet_slot_held.set(0)
        self._record()

    def _fresh(self) -> bool:
        lease = self._backend.lease_seconds
        return lease is None or self._clock.monotonic() - self._renewed_at < lease - 2

    def _failed(self, error: FleetError) -> None:
        """A coordinator call failed: counted, and logged once per change of cause."""
        self._metrics.fleet_errors.labels(backend=self._backend.name, reason=error.reason).inc()
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

    def _answered(self) -> None:
        if self._problem is not None:
            self._log.info("fleet.available", after=self._problem)
            self._problem = self._problem_reason = None
            self._record()

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
