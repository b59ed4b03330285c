"""``rehearse``: the configured hooks, for real, against a synthetic event on a private emulator.

The agent's own daemon runs, on a copy of the configuration pointed at an emulator started on
127.0.0.1 with an in-memory state store: the real IMDS is never contacted and the real state
store never touched. The report says how long each hook took, whether the prepare phase ended
before NotBefore (with the margin), and what the agent did then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from agent.clock import SystemClock
from agent.config import Config
from agent.daemon import Daemon, assemble
from agent.emulator.server import EmulatorServer
from agent.emulator.world import MINIMUM_NOTICE_SECONDS, ControlError, World
from agent.imds import ImdsClient, RetryPolicy
from agent.lifecycle import DONE
from agent.state import Store

REHEARSAL_VM = "rehearsal-vm"
# How long the synthetic event stays Started after the approval (the "maintenance").
MAINTENANCE_SECONDS = 1.0


@dataclass(frozen=True)
class HookLine:
    phase: str
    hook: str
    outcome: str
    seconds: float


@dataclass(frozen=True)
class Rehearsal:
    event_type: str
    notice_seconds: float
    hooks: tuple[HookLine, ...]
    prepare_seconds: float  # from the event's arrival to the end of the last prepare hook
    margin_seconds: float  # NotBefore minus the end of the prepare phase (< 0: too late)
    decision: str
    approved_after_seconds: float | None  # from the arrival, None when not approved
    total_seconds: float

    @property
    def fits(self) -> bool:
        return self.margin_seconds >= 0 and all(
            line.outcome == "succeeded" for line in self.hooks if line.phase == "prepare"
        )


def default_notice(event_type: str) -> float:
    return float(MINIMUM_NOTICE_SECONDS.get(event_type, 15 * 60))


def rehearse(
    config: Config, event_type: str, notice_seconds: float, *, timeout_seconds: float = 3600
) -> Rehearsal:
    """Run one rehearsal of ``event_type`` with ``notice_seconds`` of notice."""
    vm_name = config.vm_name or REHEARSAL_VM
    world = World(vm_name=vm_name)
    server = EmulatorServer(world, "127.0.0.1", 0, rate_limit=None).start()
    try:
        settings = dataclasses.replace(
            config,
            vm_name=vm_name,
            imds=dataclasses.replace(config.imds, url=server.url, poll_interval_seconds=0.25),
            events=dataclasses.replace(
                config.events,
                types=tuple(dict.fromkeys((*config.events.types, event_type))),
                gone_grace_seconds=0.5,
            ),
            state=dataclasses.replace(config.state, path=":memory:"),
            metrics=dataclasses.replace(config.metrics, listen=None),
            maintenance=dataclasses.replace(config.maintenance, check_interval_seconds=0),
            fleet=dataclasses.replace(config.fleet, url=None),
        )
        return _run(
            settings,
            world,
            server=server,
            event_type=event_type,
            notice_seconds=notice_seconds,
            timeout_seconds=timeout_seconds,
        )
    finally:
        server.stop()


def _run(
    config: Config,
    world: World,
    *,
    server: EmulatorServer,
    event_type: str,
    notice_seconds: float,
    timeout_seconds: float,
) -> Rehearsal:
    stop = threading.Event()
    clock = SystemClock(stop)
    log = structlog.get_logger("agent").bind(rehearsal=event_type)
    imds = ImdsClient(
        server.url, clock=clock, stop=stop, retry=RetryPolicy(budget_seconds=5), logger=log
    )
    store = Store(":memory:")
    parts = assemble(
        config,
        imds=imds,
        store=store,
        clock=clock,
        stop=stop,
        log=log,
        vm_name=config.vm_name or REHEARSAL_VM,
        check_ownership=os.geteuid() == 0,  # as the daemon would: a refused hook shows
    )
    daemon = Daemon(parts)
    thread = threading.Thread(target=daemon.run, name="rehearsal", daemon=True)
    thread.start()
    try:
        arrived = clock.now()
        event = world.add(
            {
                "type": event_type,
                "not_before_in_seconds": notice_seconds,
                "started_for_seconds": MAINTENANCE_SECONDS,
                "description": "scheduled-events-agent rehearse",
            }
        )
        not_before = event.not_before
        key = event.event_id.lower()
        deadline = time.monotonic() + timeout_seconds
        while True:
            record = store.get(key)
            if record is not None and record.state == DONE:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the rehearsal of {event_type} did not end in time")
            if record is not None and record.state == "waiting" and not_before is not None:
                # Not approved: the maintenance comes at NotBefore; here, at once (unless
                # NotBefore came first, and with it the maintenance and its end).
                with contextlib.suppress(ControlError):
                    world.start(event.event_id)
            time.sleep(0.05)
        ended = clock.now()
        runs = store.hook_runs(key)
        approvals = [a for a in store.approvals(key) if a.outcome == "succeeded"]
        record = store.get(key)
        assert record is not None
    finally:
        stop.set()
        thread.join(timeout=30)
        store.close()
        imds.close()
    hooks = tuple(
        HookLine(
            run.phase,
            run.hook,
            run.outcome or "cut short",
            _between(run.started_at, run.ended_at or run.started_at),
        )
        for run in runs
    )
    prepare_end = max(
        (_parse(run.ended_at) for run in runs if run.phase == "prepare" and run.ended_at),
        default=arrived,
    )
    target = not_before if not_before is not None else arrived
    return Rehearsal(
        event_type=event_type,
        notice_seconds=notice_seconds,
        hooks=hooks,
        prepare_seconds=(prepare_end - arrived).total_seconds(),
        margin_seconds=(target - prepare_end).total_seconds(),
        decision=record.decision or "-",
        approved_after_seconds=(
            (_parse(approvals[0].ended_at or approvals[0].started_at) - arrived).total_seconds()
            if approvals
            else None
        ),
        total_seconds=(ended - arrived).total_seconds(),
    )


def _parse(moment: str) -> datetime:
    return datetime.fromisoformat(moment)


def _between(start: str, end: str) -> float:
    return (_parse(end) - _parse(start)).total_seconds()


def text(rehearsal: Rehearsal) -> str:
    lines = [f"rehearsal: {rehearsal.event_type} with {rehearsal.notice_seconds:g} s of notice"]
    for line in rehearsal.hooks:
        lines.append(f"  {line.phase} hook {line.hook}: {line.outcome} in {line.seconds:.2f} s")
    if not rehearsal.hooks:
        lines.append("  no hook ran (none configured for this type)")
    verdict = "fits" if rehearsal.fits else "does NOT fit"
    lines.append(
        f"  prepare phase: {rehearsal.prepare_seconds:.2f} s; {verdict}: "
        f"{rehearsal.margin_seconds:.2f} s before NotBefore"
    )
    if rehearsal.approved_after_seconds is not None:
        lines.append(
            f"  the agent would approve {rehearsal.approved_after_seconds:.2f} s after the event "
            f"appeared ({rehearsal.decision})"
        )
    else:
        lines.append(
            f"  the agent would not approve: {rehearsal.decision}; the maintenance would come "
            "at NotBefore"
        )
    lines.append(f"  total, recover hooks included: {rehearsal.total_seconds:.2f} s")
    return "\n".join(lines)


def table(rehearsals: list[Rehearsal]) -> str:
    header = f"{'type':<10} {'notice':>8} {'prepare':>9} {'margin':>9} {'recover':>9}  verdict"
    lines = [header]
    for r in rehearsals:
        recover = sum(line.seconds for line in r.hooks if line.phase == "recover")
        approved = "approve" if r.approved_after_seconds is not None else "no approval"
        lines.append(
            f"{r.event_type:<10} {r.notice_seconds:>7g}s {r.prepare_seconds:>8.2f}s "
            f"{r.margin_seconds:>8.2f}s {recover:>8.2f}s  "
            f"{'fits' if r.fits else 'DOES NOT FIT'}, {approved}"
        )
    return "\n".join(lines)


def as_json(rehearsal: Rehearsal) -> dict[str, Any]:
    return {**dataclasses.asdict(rehearsal), "fits": rehearsal.fits}
