"""The mirror run of ``make bench``: 20 local clients poll the agent's mirror every second.

The agent is the real process (``run``), with its listener on 127.0.0.1; the emulator and the
clients run in this process. Two phases of the same length, one without clients and one with
them, count the Scheduled Events requests that reach the emulator (its stats): the mirror must
add none. During the second, a new incarnation is published every few seconds, and each client
notes when it first sees it; against the moment the emulator sent that incarnation to the agent,
that is how stale the mirror left the client (one poll interval of the client at most, plus
the round trips).
"""

from __future__ import annotations

import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests
import yaml

from agent.emulator.server import EmulatorServer
from agent.emulator.world import World
from bench.common import free_port

ROOT = Path(__file__).resolve().parent.parent
VERSION = "2020-07-01"
INTERVAL = 1.0


class Client(threading.Thread):
    """Polls the mirror every second, as a monitoring agent would; notes when it first saw
    each incarnation."""

    def __init__(self, url: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = stop
        self.first_seen: dict[int, float] = {}
        self.reads = 0
        self.failures = 0

    def run(self) -> None:
        session = requests.Session()
        session.trust_env = False
        self.stop.wait(random.uniform(0, INTERVAL))  # clients start at random phases
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                response = session.get(self.url, headers={"Metadata": "true"}, timeout=5)
                incarnation = response.json()["DocumentIncarnation"]
                self.reads += 1
                self.first_seen.setdefault(incarnation, time.time())
            except (requests.RequestException, ValueError, KeyError):
                self.failures += 1
            self.stop.wait(max(0.0, INTERVAL - (time.monotonic() - started)))
        session.close()


def measure_mirror(clients: int, seconds: float) -> dict[str, Any]:
    world = World(vm_name="web_4")
    server = EmulatorServer(world, rate_limit=None).start()
    port = free_port()
    mirror_url = f"http://127.0.0.1:{port}/metadata/scheduledevents?api-version={VERSION}"
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        for name in ("prepare.d", "recover.d"):
            (workdir / name).mkdir(mode=0o755)
        config = {
            "imds": {"url": server.url, "poll_interval_seconds": INTERVAL},
            "vm_name": "web_4",
            "hooks": {
                "prepare_dir": str(workdir / "prepare.d"),
                "recover_dir": str(workdir / "recover.d"),
            },
            "state": {"path": str(workdir / "state.db")},
            "metrics": {"listen": f"127.0.0.1:{port}"},
            "arm": {"url": server.url},
            "logging": {"format": "json", "level": "warning"},
        }
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        with (workdir / "agent.log").open("ab") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(workdir / "config.yaml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
            try:
                return _phases(server, world, mirror_url, clients, seconds)
            finally:
                agent.send_signal(signal.SIGTERM)
                agent.wait(timeout=60)
                server.stop()


def _phases(
    server: EmulatorServer, world: World, url: str, clients: int, seconds: float
) -> dict[str, Any]:
    probe = requests.Session()
    probe.trust_env = False
    deadline = time.monotonic() + 30
    while True:  # the agent is up and its mirror answers
        try:
            if probe.get(url, headers={"Metadata": "true"}, timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the agent's mirror never answered")
        time.sleep(0.05)
    probe.close()

    def imds_requests_per_minute(action: Any) -> float:
        before, started = server.scheduled_events_requests, time.monotonic()
        action()
        elapsed = time.monotonic() - started
        return (server.scheduled_events_requests - before) * 60 / elapsed

    alone = imds_requests_per_minute(lambda: time.sleep(seconds))
    stop = threading.Event()
    polling = [Client(url, stop) for _ in range(clients)]
    for client in polling:
        client.start()
    time.sleep(INTERVAL * 2)  # every client is polling
    published: list[int] = []

    def publish() -> None:
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            time.sleep(random.uniform(2.0, 4.0))
            world.add({"type": "Freeze", "resources": ["web_9"]})
            published.append(world.incarnation)
        time.sleep(INTERVAL * 2)  # the last one reaches every client

    shared = imds_requests_per_minute(publish)
    stop.set()
    for client in polling:
        client.join(timeout=10)
    delays = []
    missed = 0
    for incarnation in published:
        sent = server.documents_sent_at.get(incarnation)
        if sent is None:
            continue  # superseded before the agent polled: nobody could see it
        for client in polling:
            seen = client.first_seen.get(incarnation)
            if seen is None:
                later = [at for number, at in client.first_seen.items() if number > incarnation]
                if not later:
                    missed += 1
                    continue
                seen = min(later)
            delays.append(seen - sent)
    return {
        "clients": clients,
        "seconds": seconds,
        "imds_requests_per_minute_without_clients": alone,
        "imds_requests_per_minute_with_clients": shared,
        "mirror_extra_imds_requests_per_minute": shared - alone,
        "mirror_reads": sum(client.reads for client in polling),
        "mirror_client_failures": sum(c.failures for c in polling),
        "incarnations_published": len(published),
        "mirror_missed_incarnations": missed,
        "mirror_staleness_p50_seconds": statistics.median(delays) if delays else None,
        "mirror_staleness_max_seconds": max(delays) if delays else None,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(measure_mirror(20, 10.0 if "--quick" in sys.argv else 30.0), indent=2))
