"""Helpers for tests that run the agent: hook scripts that record their calls, a daemon in a thread.

The hooks append one line per call to ``calls.log``: ``start|end PHASE TYPE EVENT_ID``. A hook
blocks while a file ``block-PHASE-TYPE`` exists, after writing its process-group id to
``pid-PHASE-TYPE``, so tests can hold it mid-run, kill it, or release it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from agent.clock import SystemClock
from agent.config import Config, parse
from agent.daemon import Daemon, assemble
from agent.fleet import FleetGate, gate_for
from agent.imds import ImdsClient, RetryPolicy
from agent.metrics import Metrics
from agent.state import Store

RECORDING_HOOK = """#!/bin/sh
dir="{directory}"
tag="$SCHEDULED_EVENT_PHASE-$SCHEDULED_EVENT_TYPE"
echo "start $SCHEDULED_EVENT_PHASE $SCHEDULED_EVENT_TYPE $SCHEDULED_EVENT_ID" >> "$dir/calls.log"
if [ -e "$dir/block-$tag" ]; then
  # The hook's process group (its shepherd's): what a killed agent leaves running.
  sed 's/.*) //' /proc/$$/stat | cut -d' ' -f3 > "$dir/pid-$tag.tmp"
  mv "$dir/pid-$tag.tmp" "$dir/pid-$tag"
  while [ -e "$dir/block-$tag" ]; do sleep 0.05; done
fi
if [ -e "$dir/fail-$tag" ]; then
  echo "failing on purpose"
  exit 3
fi
echo "end $SCHEDULED_EVENT_PHASE $SCHEDULED_EVENT_TYPE $SCHEDULED_EVENT_ID" >> "$dir/calls.log"
"""


def write_recording_hooks(directory: Path) -> tuple[Path, Path]:
    prepare = directory / "prepare.d"
    recover = directory / "recover.d"
    for hooks in (prepare, recover):
        hooks.mkdir(parents=True, exist_ok=True)
        hooks.chmod(0o755)
        path = hooks / "10-record"
        path.write_text(RECORDING_HOOK.format(directory=directory))
        path.chmod(0o755)
    return prepare, recover


def calls(directory: Path) -> list[str]:
    log = directory / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def config_for(
    directory: Path, imds_url: str, *, recording_hooks: bool = True, **sections: Any
) -> dict[str, Any]:
    if recording_hooks:
        prepare, recover = write_recording_hooks(directory)
    else:
        prepare, recover = directory / "prepare.d", directory / "recover.d"
    data: dict[str, Any] = {
        "imds": {"url": imds_url, "poll_interval_seconds": 0.25},
        "vm_name": "web_4",
        "hooks": {
            "prepare_dir": str(prepare),
            "recover_dir": str(recover),
            "timeout_seconds": 60,
            "kill_grace_seconds": 1,
            "tempfail_retry_seconds": 0.1,
        },
        # A short grace keeps the tests quick; the default (5 s) is tested on its own.
        "events": {"gone_grace_seconds": 0.6},
        "state": {"path": str(directory / "state.db")},
        "metrics": {"listen": None},
        # The emulator serves Azure Resource Manager too: nothing leaves 127.0.0.1.
        "arm": {"url": imds_url},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(name, {}).update(values)
        else:
            data[name] = values
    return data


@dataclass
class RunningAgent:
    daemon: Daemon
    store: Store
    stop: threading.Event
    thread: threading.Thread | None
    imds: ImdsClient
    metrics: Metrics | None = None
    fleet: FleetGate | None = None

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
            assert not self.thread.is_alive(), "the daemon did not stop"
        self.store.close()
        self.imds.close()
        if self.fleet is not None:
            self.fleet.close()


def build_agent(
    directory: Path, imds_url: str, *, dry_run: bool = False, **sections: Any
) -> RunningAgent:
    config: Config = parse(config_for(directory, imds_url, **sections))
    metrics = Metrics(CollectorRegistry())
    stop = threading.Event()
    log = structlog.get_logger("agent")
    # End to end: the real clock, to test the wiring (the logic is tested on a fake one).
    clock = SystemClock(stop)
    imds = ImdsClient(
        config.imds.url,
        clock=clock,
        stop=stop,
        retry=RetryPolicy(budget_seconds=5, initial_wait_seconds=0.02, max_wait_seconds=0.2),
        logger=log,
    )
    store = Store(":memory:" if dry_run else config.state.path)
    vm_name = config.vm_name or "web_4"
    fleet = None
    if config.fleet.url is not None:
        holder = config.fleet.id or vm_name
        fleet = gate_for(
            config.fleet,
            holder=holder,
            imds=imds,
            store=store,
            metrics=metrics,
            clock=clock,
            stop=stop,
            log=log,
            env={},
        )
    parts = assemble(
        config,
        imds=imds,
        store=store,
        clock=clock,
        stop=stop,
        log=log,
        vm_name=vm_name,
        dry_run=dry_run,
        metrics=metrics,
        fleet=fleet,
    )
    return RunningAgent(Daemon(parts), store, stop, None, imds, metrics, fleet)


def state_of(agent: RunningAgent, event_id: str) -> str | None:
    """The stored state of ``event_id`` in the in-thread agent's store, None if unknown."""
    record = agent.store.get(event_id)
    return record.state if record else None


def start_agent(directory: Path, imds_url: str, **options: Any) -> RunningAgent:
    agent = build_agent(directory, imds_url, **options)
    agent.thread = threading.Thread(target=agent.daemon.run, name="daemon")
    agent.thread.start()
    return agent
