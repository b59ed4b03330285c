"""One worker thread per event, and the gate that keeps recover hooks apart from prepare hooks.

Invariants of :class:`Workers`:
- At most one thread works a key at any time. Only the thread that owns a key's entry removes
  it, so a wakeup never starts a second worker beside a live one.
- A wakeup that comes while the worker is busy is never lost: the worker takes another step.
- An unexpected exception ends that worker only: it is handed to ``on_error`` (which logs and
  counts it) and the key is free for the next wakeup.

Invariants of :class:`HookGate` (hooks/README.md):
- A recover hook starts only when no prepare hook runs and ``blocked()`` says no other event is
  being prepared, approved or awaited; one event's recover hooks run before the next event's.
- A prepare hook never starts while a recover hook runs. Prepare hooks of different events may
  run at the same time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection


class Workers:
    def __init__(
        self,
        step: Callable[[str], bool],
        *,
        stop: threading.Event,
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        """``step(key)`` does one step of the key's work: True to take another at once."""
        self._step = step
        self._stop = stop
        self._on_error = on_error
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._pending: set[str] = set()

    def wake(self, key: str) -> None:
        """Have ``key`` worked: start its worker, or tell the running one to look again."""
        with self._lock:
            self._pending.add(key)
            if key in self._threads:
                return
            worker = threading.Thread(target=self._work, args=(key,), name=f"event-{key[:8]}")
            self._threads[key] = worker
            worker.start()

    def busy(self) -> list[str]:
        with self._lock:
            return sorted(self._threads)

    def join(self) -> None:
        """Wait until no worker runs (new ones started meanwhile included)."""
        while True:
            with self._lock:
                workers = list(self._threads.values())
            if not workers:
                return
            for worker in workers:
                worker.join()

    def _work(self, key: str) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    self._pending.discard(key)
                if self._step(key):
                    continue
                with self._lock:
                    if key not in self._pending:
                        del self._threads[key]
                        return
        except Exception as error:
            self._on_error(key, error)
        with self._lock:
            self._pending.discard(key)
            if self._threads.get(key) is threading.current_thread():
                del self._threads[key]


class HookGate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._preparing: dict[str, int] = {}
        self._recover_running = False
        self._recover_owner: str | None = None

    def recover_running(self, key: str | None = None) -> bool:
        """True while a recover hook runs (of an event other than ``key``)."""
        with self._lock:
            return self._recover_running and self._recover_owner != key

    def try_prepare(self, key: str) -> bool:
        with self._lock:
            if self._recover_running:
                return False
            self._preparing[key] = self._preparing.get(key, 0) + 1
            return True

    def try_recover(self, key: str, blocked: Callable[[], bool]) -> bool:
        """Start one recover hook of ``key`` unless prepare hooks run, another event's recover
        phase is under way, or ``blocked()`` (called under the gate's lock) says no."""
        with self._lock:
            if self._preparing or self._recover_running:
                return False
            if self._recover_owner not in (None, key) or blocked():
                return False
            self._recover_running = True
            self._recover_owner = key
            return True

    def hook_ended(self, key: str, phase: str) -> None:
        with self._lock:
            if phase == "recover":
                self._recover_running = False
                return
            left = self._preparing.get(key, 0) - 1
            if left > 0:
                self._preparing[key] = left
            else:
                self._preparing.pop(key, None)

    def recover_finished(self, key: str) -> None:
        """``key``'s recover phase is over: another event's may begin."""
        with self._lock:
            if self._recover_owner == key:
                self._recover_owner = None


class HeadStart:
    """Lets the thread that takes in a document wait, for a bounded time, until the workers of
    this VM's new events have started their first hook (or found nothing to do yet) before it
    goes on with the rest: in one process, threads share one interpreter lock, and thousands of
    other VMs' events taken in beside a worker slow it down.

    ``expect(key)`` comes before the key's worker is woken, so its ``reached(key)`` is never
    missed; a key reached (or never expected) is not waited for.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, threading.Event] = {}

    def expect(self, key: str) -> None:
        with self._lock:
            self._pending.setdefault(key, threading.Event())

    def reached(self, key: str) -> None:
        with self._lock:
            pending = self._pending.pop(key, None)
        if pending is not None:
            pending.set()

    def wait(self, keys: Collection[str], seconds: float, stop: threading.Event) -> bool:
        """Wait until every key is reached, at most ``seconds`` (or until ``stop``); True when
        all were."""
        with self._lock:
            waiting = [self._pending[key] for key in keys if key in self._pending]
        deadline = time.monotonic() + seconds
        for pending in waiting:
            while not pending.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                if stop.is_set() or time.monotonic() >= deadline:
                    return False
        return True
