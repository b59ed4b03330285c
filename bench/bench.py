"""make bench: how fast the agent reacts and what it costs a VM, against the emulator.

Starts the emulator and the real agent as processes (talking only to 127.0.0.1), with hook
scripts that record timestamps, and writes bench/results.json and a table. Measures:

1. detection: the emulator publishes an event -> the first prepare hook starts (1 s polls)
2. approval: the last prepare hook exits -> the emulator receives the approval
3. preempt budget: 30 s notice and a 5 s hook -> time left before NotBefore at approval
4. idle cost: CPU per poll and RSS over 10,000 polls of an unchanged document, beside a bare
   requests+json loop measured in the same run
5. growth: CPU per poll for documents of 1, 10, 100 and 1,000 events, changing and unchanged
6. start-up: process start -> the first poll sent
7. document size: a document of 1 to 5,000 other VMs' events and this VM's Preempt -> its first
   hook starts, first seen and changed, on this disk and on one whose fsync takes 5 ms
   (bench/first_hook.py)
8. mirror: 20 local clients poll the agent's mirror every second: IMDS requests with and
   without them, and how stale each client sees a new incarnation (bench/mirror.py)
9. fleet: 16 agents of one group share 2 slots in Azurite (bench/fleet.py)

``--quick`` runs fewer repetitions (for a smoke test); the figures it gives mean less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import requests
import structlog
import yaml

from agent.clock import SystemClock
from agent.config import parse
from agent.daemon import Daemon, assemble
from agent.emulator.server import EmulatorServer
from agent.emulator.world import World
from agent.imds import ImdsClient
from agent.state import Store

ROOT = Path(__file__).resolve().parent.parent

TARGETS = {
    "detection_p50_seconds": ("<=", 0.6),
    "detection_p99_seconds": ("<=", 1.1),
    "approval_p99_seconds": ("<=", 0.1),
    "preempt_budget_min_seconds": (">=", 23.0),
    "idle_cpu_ratio": ("<=", 1.5),
    "idle_rss_mb": ("<=", 45.0),
    "idle_rss_growth_mb": ("<=", 1.0),
    "growth_1000_changed_ms": ("<", 50.0),
    "startup_p99_seconds": ("<=", 1.0),
    "first_hook_first_seen_fast_5000_ms": ("<=", 50.0),
    "first_hook_changed_fast_5000_ms": ("<=", 50.0),
    # One request more or less at each end of two 30 s phases is 2 a minute: none is added.
    "mirror_extra_imds_requests_per_minute": ("<=", 2.0),
    "mirror_missed_incarnations": ("<=", 0),
    "mirror_staleness_max_seconds": ("<=", 1.1),
    "fleet_most_held_at_once": ("<=", 2),
    "fleet_missed_early_approvals": ("<=", 0),
    "fleet_order_inversions": ("<=", 0),
    "fleet_requests_per_agent_minute_idle": ("<=", 0),
}
STAMP_HOOK = """#!/bin/sh
echo "start $SCHEDULED_EVENT_ID $(date +%s.%N)" >> {log}
[ "$SCHEDULED_EVENT_TYPE" = Preempt ] && sleep 5
echo "end $SCHEDULED_EVENT_ID $(date +%s.%N)" >> {log}
"""


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


@contextmanager
def emulator(*options: str) -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "agent", "emulator", "--port", "0", *options],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert process.stdout is not None
    match = re.search(r"(http://127\.0\.0\.1:\d+)", process.stdout.readline())
    assert match, "the emulator did not start"
    try:
        yield match.group(1)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        process.stdout.close()


@contextmanager
def agent(workdir: Path, url: str, interval: float = 1.0) -> Iterator[subprocess.Popen[bytes]]:
    prepare = workdir / "prepare.d"
    prepare.mkdir(mode=0o755, parents=True, exist_ok=True)
    (workdir / "recover.d").mkdir(mode=0o755, exist_ok=True)
    hook = prepare / "10-stamp"
    hook.write_text(STAMP_HOOK.format(log=workdir / "stamps.log"))
    hook.chmod(0o755)
    config = {
        "imds": {"url": url, "poll_interval_seconds": interval},
        "vm_name": "web_4",
        "hooks": {"prepare_dir": str(prepare), "recover_dir": str(workdir / "recover.d")},
        "state": {"path": str(workdir / "state.db")},
        "metrics": {"listen": None},
        "arm": {"url": url},
        "logging": {"format": "json", "level": "warning"},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    log = (workdir / "agent.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(workdir / "config.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        log.close()


def wait_for(condition: Any, timeout: float = 60.0, interval: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(interval)


def stamps(workdir: Path) -> dict[tuple[str, str], float]:
    path = workdir / "stamps.log"
    found = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        kind, event_id, moment = line.split()
        found[(kind, event_id)] = float(moment)
    return found


def approval_times(session: requests.Session, url: str) -> dict[str, float]:
    times = {}
    for approval in session.get(f"{url}/emulator/approvals", timeout=5).json():
        moment = datetime.fromisoformat(approval["time"].replace("Z", "+00:00")).timestamp()
        for request in approval["body"]["StartRequests"]:
            times[request["EventId"]] = moment
    return times


def measure_reaction(repetitions: int) -> dict[str, Any]:
    detection, approval = [], []
    session = requests.Session()
    session.trust_env = False
    with tempfile.TemporaryDirectory() as directory, emulator("--rate-limit", "0") as url:
        workdir = Path(directory)
        workdir.chmod(0o755)
        with agent(workdir, url):
            wait_for((workdir / "agent.log").exists)
            time.sleep(2)  # let the agent start and take its first polls
            for _ in range(repetitions):
                time.sleep(random.uniform(0, 1))  # sample every phase of the poll loop
                published = time.time()
                event = session.post(
                    f"{url}/emulator/events",
                    json={
                        "type": "Reboot",
                        "not_before_in_seconds": 900,
                        "started_for_seconds": 0.1,
                    },
                    timeout=5,
                ).json()
                event_id = event["EventId"]
                started = wait_for(lambda e=event_id: stamps(workdir).get(("start", e)))
                ended = wait_for(lambda e=event_id: stamps(workdir).get(("end", e)))
                approved = wait_for(lambda e=event_id: approval_times(session, url).get(e))
                detection.append(started - published)
                approval.append(approved - ended)
    return {
        "repetitions": repetitions,
        "detection_p50_seconds": statistics.median(detection),
        "detection_p99_seconds": percentile(detection, 0.99),
        "detection_max_seconds": max(detection),
        "approval_p50_seconds": statistics.median(approval),
        "approval_p99_seconds": percentile(approval, 0.99),
        "approval_max_seconds": max(approval),
    }


def measure_preempt(repetitions: int) -> dict[str, Any]:
    budgets = []
    session = requests.Session()
    session.trust_env = False
    with tempfile.TemporaryDirectory() as directory, emulator("--rate-limit", "0") as url:
        workdir = Path(directory)
        workdir.chmod(0o755)
        with agent(workdir, url):
            time.sleep(2)
            for _ in range(repetitions):
                time.sleep(random.uniform(0, 1))
                event = session.post(
                    f"{url}/emulator/events",
                    json={
                        "type": "Preempt",
                        "not_before_in_seconds": 30,
                        "started_for_seconds": 0.1,
                    },
                    timeout=5,
                ).json()
                not_before = parsedate_to_datetime(event["NotBefore"]).timestamp()
                approved = wait_for(
                    lambda event_id=event["EventId"]: approval_times(session, url).get(event_id),
                    timeout=40,
                )
                budgets.append(not_before - approved)
    return {
        "repetitions": repetitions,
        "preempt_budget_min_seconds": min(budgets),
        "preempt_budget_p50_seconds": statistics.median(budgets),
    }


BARE_LOOP = """
import json, os, resource, sys, requests
url, polls = sys.argv[1], int(sys.argv[2])
session = requests.Session()
session.trust_env = False
for _ in range(200):
    json.loads(session.get(url, headers={"Metadata": "true"}, timeout=5).content)
before = os.times()
for _ in range(polls):
    json.loads(session.get(url, headers={"Metadata": "true"}, timeout=5).content)
after = os.times()
cpu = (after.user - before.user) + (after.system - before.system)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"cpu_per_poll_seconds": cpu / polls, "rss_mb": rss}))
"""


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def process_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def measure_idle(polls: int) -> dict[str, Any]:
    session = requests.Session()
    session.trust_env = False
    with tempfile.TemporaryDirectory() as directory, emulator("--rate-limit", "0") as url:
        workdir = Path(directory)
        workdir.chmod(0o755)
        # One event for another VM: a realistic, unchanging document.
        session.post(
            f"{url}/emulator/events", json={"type": "Reboot", "resources": ["web_9"]}, timeout=5
        )

        def requests_served() -> int:
            served: int = session.get(f"{url}/emulator/stats", timeout=5).json()["requests"]
            return served

        with agent(workdir, url, interval=0.0005) as process:
            wait_for(lambda: requests_served() > 500, timeout=120, interval=0.05)
            start_requests, start_cpu = requests_served(), process_cpu_seconds(process.pid)
            half = start_requests + polls // 2
            wait_for(lambda: requests_served() >= half, timeout=600, interval=0.05)
            rss_half = process_rss_mb(process.pid)
            wait_for(
                lambda: requests_served() >= start_requests + polls, timeout=600, interval=0.05
            )
            end_requests, end_cpu = requests_served(), process_cpu_seconds(process.pid)
            rss_end = process_rss_mb(process.pid)
        # Control requests counted above are the bench's own: two per check at most, a few
        # hundred in all, against 10,000 polls; they are subtracted as an estimate.
        agent_polls = end_requests - start_requests
        bare = subprocess.run(
            [
                sys.executable,
                "-c",
                BARE_LOOP,
                f"{url}/metadata/scheduledevents?api-version=2020-07-01",
                str(polls),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        bare_figures = json.loads(bare.stdout)
    agent_cpu = (end_cpu - start_cpu) / agent_polls
    return {
        "polls": agent_polls,
        "agent_cpu_per_poll_ms": agent_cpu * 1000,
        "bare_cpu_per_poll_ms": bare_figures["cpu_per_poll_seconds"] * 1000,
        "idle_cpu_ratio": agent_cpu / bare_figures["cpu_per_poll_seconds"],
        "idle_rss_mb": rss_end,
        "idle_rss_half_mb": rss_half,
        "idle_rss_growth_mb": rss_end - rss_half,
        "bare_rss_mb": bare_figures["rss_mb"],
    }


def measure_growth(sizes: tuple[int, ...], repetitions: int) -> dict[str, Any]:
    """In-process: the poll runs in this thread, so thread_time counts only the agent's side."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    results: dict[str, Any] = {}
    for size in sizes:
        with tempfile.TemporaryDirectory() as directory:
            world = World(vm_name="web_4")
            server = EmulatorServer(world, rate_limit=None).start()
            for _ in range(size):
                world.add({"type": "Reboot", "resources": ["web_9"]})
            config = parse(
                {
                    "imds": {"url": server.url},
                    "vm_name": "web_4",
                    "state": {"path": f"{directory}/state.db"},
                    "metrics": {"listen": None},
                }
            )
            stop = threading.Event()
            clock = SystemClock(stop)
            imds = ImdsClient(server.url, clock=clock, stop=stop)
            store = Store(config.state.path)
            daemon = Daemon(
                assemble(
                    config,
                    imds=imds,
                    store=store,
                    clock=clock,
                    stop=stop,
                    log=structlog.get_logger(),
                    vm_name="web_4",
                )
            )
            daemon.poll()  # discovers the events: the one-off cost, not measured
            unchanged = []
            for _ in range(repetitions):
                before = time.thread_time()
                daemon.poll()
                unchanged.append(time.thread_time() - before)
            changed = []
            for _ in range(repetitions):
                extra = world.add({"type": "Freeze", "resources": ["web_9"]})
                before = time.thread_time()
                daemon.poll()
                changed.append(time.thread_time() - before)
                world.cancel(extra.event_id)
                daemon.poll()
            results[str(size)] = {
                "unchanged_ms": statistics.median(unchanged) * 1000,
                "changed_ms": statistics.median(changed) * 1000,
            }
            store.close()
            imds.close()
            server.stop()
    results_1000 = results.get("1000", {})
    return {"by_size": results, "growth_1000_changed_ms": results_1000.get("changed_ms")}


def measure_startup(repetitions: int) -> dict[str, Any]:
    session = requests.Session()
    session.trust_env = False
    figures = []
    for _ in range(repetitions):
        with tempfile.TemporaryDirectory() as directory, emulator("--rate-limit", "0") as url:
            workdir = Path(directory)
            workdir.chmod(0o755)
            started = time.time()
            with agent(workdir, url):
                first = wait_for(
                    lambda: session.get(f"{url}/emulator/stats", timeout=5).json()[
                        "first_metadata_request_at"
                    ],
                    timeout=30,
                    interval=0.02,
                )
            figures.append(first - started)
    return {
        "repetitions": repetitions,
        "startup_p50_seconds": statistics.median(figures),
        "startup_p99_seconds": percentile(figures, 0.99),
    }


def measure_first_hook_run(quick: bool) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from bench.first_hook import measure_first_hook  # noqa: PLC0415 (needs ROOT on the path)

    return measure_first_hook((1, 100, 1000, 5000), 1 if quick else 5)


def measure_mirror_run(quick: bool) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from bench.mirror import measure_mirror  # noqa: PLC0415 (needs ROOT on the path)

    return measure_mirror(20, 10.0 if quick else 30.0)


def measure_fleet_run(quick: bool) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))  # bench.fleet and the Azurite harness of the tests
    from bench.fleet import measure_fleet  # noqa: PLC0415 (needs ROOT on the path first)

    return measure_fleet(6 if quick else 16, 3.0, 10 if quick else 30)


def verdicts(figures: dict[str, Any]) -> dict[str, bool]:
    met = {}
    for name, (operator, target) in TARGETS.items():
        value = figures.get(name)
        if value is None:
            continue
        met[name] = (
            value <= target
            if operator == "<="
            else (value >= target if operator == ">=" else value < target)
        )
    return met


def table(figures: dict[str, Any], met: dict[str, bool]) -> str:
    lines = [f"{'figure':36} {'value':>12}  target", "-" * 64]
    for name, (operator, target) in TARGETS.items():
        if name not in figures or figures[name] is None:
            continue
        verdict = "ok" if met[name] else "MISSED"
        lines.append(f"{name:36} {figures[name]:12.4f}  {operator} {target:g}  {verdict}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results.json"))
    arguments = parser.parse_args()
    quick = arguments.quick
    header = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "quick": quick,
    }
    print(f"bench: {header['cores']} cores, Python {header['python']}, quick={quick}", flush=True)
    figures: dict[str, Any] = {}
    sections = {}
    for name, run in (
        ("reaction", lambda: measure_reaction(8 if quick else 60)),
        ("preempt", lambda: measure_preempt(2 if quick else 10)),
        ("idle", lambda: measure_idle(1000 if quick else 10_000)),
        ("growth", lambda: measure_growth((1, 10, 100, 1000), 5 if quick else 20)),
        ("startup", lambda: measure_startup(3 if quick else 10)),
        ("first_hook", lambda: measure_first_hook_run(quick)),
        ("mirror", lambda: measure_mirror_run(quick)),
        ("fleet", lambda: measure_fleet_run(quick)),
    ):
        print(f"bench: measuring {name} ...", flush=True)
        sections[name] = run()
        figures.update({k: v for k, v in sections[name].items() if not isinstance(v, dict)})
    met = verdicts(figures)
    result = {"header": header, "figures": figures, "sections": sections, "targets_met": met}
    Path(arguments.output).write_text(json.dumps(result, indent=2) + "\n")
    print(table(figures, met))
    print(f"bench: wrote {arguments.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
