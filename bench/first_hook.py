"""The document-size run of ``make bench``: how long this VM's Preempt waits behind other VMs'.

For documents of N other-VM events plus one Preempt for this VM (last in the document, the worst
place), it measures the time from the document's arrival to this VM's first prepare hook
starting:

- first seen: the agent starts with all N + 1 events new to it;
- changed: the agent already knows the N events, and the Preempt arrives in a new incarnation.

"Arrival" is when the emulator has sent the first whole body of the document's incarnation
(it records the moment in its stats); the hook writes its own start time. Both clocks are this
machine's. The agent is the real process (``run``), the emulator runs in this process.

Each is measured on this machine's disk and on a slow one: the agent then runs with
``bench/slowsync.c`` preloaded, which makes every fsync and fdatasync wait 5 ms first, as a VM
disk whose flushes take that long. The shim is built with the C compiler; without one the
slow-disk figures are left out, and the run says so.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from agent.emulator.server import EmulatorServer
from agent.emulator.world import World
from bench.common import wait_for

ROOT = Path(__file__).resolve().parent.parent
VM = "web_4"
SLOW_FSYNC_MS = 5
HOOK = """#!/bin/sh
echo "$SCHEDULED_EVENT_ID $(date +%s.%N)" >> {log}
"""


def build_slowsync(directory: Path) -> Path | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    library = directory / "slowsync.so"
    source = ROOT / "bench" / "slowsync.c"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"], check=True
    )
    return library


@contextmanager
def agent_process(workdir: Path, url: str, preload: Path | None) -> Iterator[Path]:
    """The agent as a process; yields the file its hook writes start times to."""
    prepare, recover = workdir / "prepare.d", workdir / "recover.d"
    prepare.mkdir(mode=0o755)
    recover.mkdir(mode=0o755)
    stamps = workdir / "stamps.log"
    hook = prepare / "10-stamp"
    hook.write_text(HOOK.format(log=stamps))
    hook.chmod(0o755)
    config = {
        "imds": {"url": url, "poll_interval_seconds": 1.0},
        "vm_name": VM,
        "hooks": {"prepare_dir": str(prepare), "recover_dir": str(recover)},
        "state": {"path": str(workdir / "state.db")},
        "metrics": {"listen": None},
        "arm": {"url": url},
        "logging": {"format": "json", "level": "warning"},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    environment = None
    if preload is not None:
        slow = {"LD_PRELOAD": str(preload), "SLOWSYNC_MS": str(SLOW_FSYNC_MS)}
        environment = {**os.environ, **slow}
    with (workdir / "agent.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(workdir / "config.yaml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=environment,
        )
        try:
            yield stamps
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def hook_started(stamps: Path, event_id: str) -> float | None:
    if not stamps.exists():
        return None
    for line in stamps.read_text().splitlines():
        seen, moment = line.split()
        if seen == event_id:
            return float(moment)
    return None


def recorded_events(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            (count,) = db.execute("SELECT count(*) FROM events").fetchone()
    except sqlite3.Error:
        return 0
    return int(count)


def one_run(size: int, mode: str, preload: Path | None) -> float:
    """Seconds from the Preempt's document arriving to its first hook starting."""
    world = World(vm_name=VM)
    server = EmulatorServer(world, rate_limit=None).start()
    try:
        for index in range(size):
            world.add({"type": "Reboot", "resources": [f"web_{1000 + index}"]})
        preempt = None
        if mode == "first_seen":
            preempt = world.add({"type": "Preempt", "resources": [VM]})
        with tempfile.TemporaryDirectory() as directory:
            workdir = Path(directory)
            workdir.chmod(0o755)
            with agent_process(workdir, server.url, preload) as stamps:
                if preempt is None:
                    # The agent knows the other events, and has polled twice since.
                    wait_for(lambda: recorded_events(workdir / "state.db") >= size)
                    seen = server.scheduled_events_requests
                    wait_for(lambda: server.scheduled_events_requests >= seen + 2)
                    preempt = world.add({"type": "Preempt", "resources": [VM]})
                incarnation = world.incarnation
                started = wait_for(lambda: hook_started(stamps, preempt.event_id), timeout=60)
            arrived = server.documents_sent_at[incarnation]
    finally:
        server.stop()
    return float(started - arrived)


def measure_first_hook(
    sizes: tuple[int, ...], repetitions: int, *, slow: bool = True
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as build:
        preload = build_slowsync(Path(build)) if slow else None
        disks: dict[str, Path | None] = {"fast": None}
        if preload is not None:
            disks["slow"] = preload
        table: dict[str, dict[str, float]] = {}
        for disk, library in disks.items():
            for mode in ("first_seen", "changed"):
                row = table.setdefault(f"{mode}_{disk}", {})
                for size in sizes:
                    runs = [one_run(size, mode, library) for _ in range(repetitions)]
                    row[str(size)] = statistics.median(runs) * 1000
    figures: dict[str, Any] = {
        "repetitions": repetitions,
        "slow_fsync_ms": SLOW_FSYNC_MS if preload is not None else None,
        "by_size_ms": table,
    }
    largest, smallest = str(max(sizes)), str(min(sizes))
    for name, row in table.items():
        figures[f"first_hook_{name}_{largest}_ms"] = row[largest]
        figures[f"first_hook_{name}_ratio"] = row[largest] / row[smallest]
    if preload is None:
        figures["note"] = "no C compiler: the slow-disk figures are left out"
    return figures


if __name__ == "__main__":
    import json

    quick = "--quick" in sys.argv
    sizes = tuple(int(word) for word in sys.argv[1:] if word.isdigit()) or (1, 100, 1000, 5000)
    figures = measure_first_hook(sizes, 1 if quick else 5, slow="--fast-only" not in sys.argv)
    print(json.dumps(figures["by_size_ms"], indent=2))
