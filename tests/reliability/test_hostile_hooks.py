"""Hostile hooks: one that ignores SIGTERM, forks children that outlive it, prints 100 MB, or
closes stdin at once. The agent (a real process) stays responsive, kills the whole group, and
keeps its memory bounded."""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import Emulator, wait_until
from tests.reliability.agents import AgentProcess, stored_state

MEMORY_BOUND_MB = 80


def hook(directory: Path, body: str) -> None:
    prepare = directory / "prepare.d"
    prepare.mkdir(mode=0o755, parents=True, exist_ok=True)
    (directory / "recover.d").mkdir(mode=0o755, exist_ok=True)
    path = prepare / "10-hostile"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state == "Z"


@pytest.fixture
def peak_rss() -> Iterator[Callable[[AgentProcess], list[float]]]:
    """Sample an agent's RSS every 20 ms while the test runs."""
    stop = threading.Event()
    samples: list[float] = []

    def watch(agent: AgentProcess) -> list[float]:
        def sample() -> None:
            while not stop.is_set() and agent.alive():
                samples.append(agent.rss_mb())
                stop.wait(0.02)

        threading.Thread(target=sample, daemon=True).start()
        return samples

    yield watch
    stop.set()


def test_a_hook_that_ignores_sigterm_and_forks_is_killed_with_its_children(
    live: Emulator, tmp_path: Path, tried: Counter[str]
) -> None:
    tmp_path.chmod(0o755)
    hook(
        tmp_path,
        f"trap '' TERM\n"
        f"(trap '' TERM; sleep 300) &\necho $! > {tmp_path}/child\n"
        f"echo $$ > {tmp_path}/self\n"
        "while true; do sleep 0.1; done\n",
    )
    agent = AgentProcess(
        tmp_path,
        live.url,
        recording_hooks=False,
        hooks={"timeout_seconds": 2, "kill_grace_seconds": 1},
        approval={"mode": "always"},
    )
    try:
        event = live.add_event(type="Reboot")
        wait_until((tmp_path / "child").exists, timeout=30)
        before = live.server.requests
        # While the hook hangs, the agent keeps polling.
        wait_until(lambda: live.server.requests > before + 4, timeout=10)
        wait_until(lambda: stored_state(tmp_path, event["EventId"]) == "approved", timeout=30)
        for name in ("self", "child"):
            pid = int((tmp_path / name).read_text())
            wait_until(lambda pid=pid: gone(pid), timeout=10)
        assert agent.alive()
    finally:
        assert agent.stop() == 0
    tried["hooks ignoring SIGTERM, killed with their children"] += 1


def test_a_hook_whose_children_outlive_it_does_not_leave_them(
    live: Emulator, tmp_path: Path, tried: Counter[str]
) -> None:
    tmp_path.chmod(0o755)
    hook(tmp_path, f"sleep 300 &\necho $! > {tmp_path}/child\nexit 0\n")
    agent = AgentProcess(tmp_path, live.url, recording_hooks=False)
    try:
        event = live.add_event(type="Reboot")
        wait_until(lambda: stored_state(tmp_path, event["EventId"]) == "approved", timeout=30)
        child = int((tmp_path / "child").read_text())
        wait_until(lambda: gone(child), timeout=10)
    finally:
        assert agent.stop() == 0
    tried["hooks whose children outlived them"] += 1


@pytest.mark.parametrize(
    "printing",
    [
        "yes 'a line of output' | head -c 100000000\n",  # 100 MB in lines
        "head -c 100000000 /dev/zero | tr '\\0' x\n",  # 100 MB in one line
    ],
    ids=["lines", "one-line"],
)
def test_a_hook_that_prints_100_mb_keeps_the_agent_small_and_responsive(
    live: Emulator,
    tmp_path: Path,
    tried: Counter[str],
    peak_rss: Callable[[AgentProcess], list[float]],
    printing: str,
) -> None:
    tmp_path.chmod(0o755)
    hook(tmp_path, printing)
    agent = AgentProcess(tmp_path, live.url, recording_hooks=False)
    samples = peak_rss(agent)
    try:
        event = live.add_event(type="Reboot")
        wait_until(lambda: stored_state(tmp_path, event["EventId"]) == "approved", timeout=120)
        assert agent.alive()
    finally:
        assert agent.stop() == 0
    assert samples, "no memory sample taken"
    assert max(samples) < MEMORY_BOUND_MB, f"peak RSS {max(samples):.1f} MB"
    tried[f"hooks printing 100 MB (peak agent RSS {max(samples):.0f} MB)"] += 1


def test_a_hook_that_closes_stdin_at_once(
    live: Emulator, tmp_path: Path, tried: Counter[str]
) -> None:
    tmp_path.chmod(0o755)
    hook(tmp_path, "exec 0<&-\nsleep 0.1\n")
    agent = AgentProcess(tmp_path, live.url, recording_hooks=False)
    try:
        event = live.add_event(type="Reboot", description="x" * 200_000)
        wait_until(lambda: stored_state(tmp_path, event["EventId"]) == "approved", timeout=30)
    finally:
        assert agent.stop() == 0
    tried["hooks closing stdin at once"] += 1
