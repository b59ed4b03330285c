"""Storage faults: the state file's directory read-only, the disk full, the file corrupted.
The agent says so loudly, keeps handling events, and loses nothing it had already written."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from agent.state import Store
from tests.agent_harness import start_agent
from tests.conftest import Emulator, approved_ids, wait_until
from tests.reliability.agents import AgentProcess


def log_entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_a_corrupted_state_file_is_reported_and_moved_aside(
    live: Emulator, tmp_path: Path, tried: Counter[str]
) -> None:
    tmp_path.chmod(0o755)
    garbage = os.urandom(8192)
    (tmp_path / "state.db").write_bytes(garbage)
    agent = AgentProcess(tmp_path, live.url)
    try:
        event = live.add_event(type="Reboot")
        wait_until(lambda: approved_ids(live) == [event["EventId"]], timeout=30)
        assert agent.alive()
    finally:
        assert agent.stop() == 0
    (loud,) = [e for e in log_entries(tmp_path / "agent.log") if e["event"] == "state.moved_aside"]
    assert loud["level"] == "error"
    # The damaged file is evidence: moved aside exactly as it was, never deleted.
    (aside,) = tmp_path.glob("state.db.corrupt-*")
    assert Path(loud["moved_to"]) == aside
    assert aside.read_bytes() == garbage
    tried["corrupted state file moved aside, events handled"] += 1


def test_a_full_disk_keeps_what_was_written_and_the_agent_going(
    live: Emulator, tmp_path: Path, tried: Counter[str]
) -> None:
    agent = start_agent(tmp_path, live.url)
    try:
        first = live.add_event(type="Reboot")
        wait_until(lambda: approved_ids(live) == [first["EventId"]])
        wait_until(
            lambda: (r := agent.store.get(first["EventId"])) is not None and r.state == "approved"
        )
        # SQLite's own limit stands in for a full disk: the next page cannot be allocated,
        # and writes fail with SQLITE_FULL ("database or disk is full"), as on a full disk.
        with agent.store._lock:
            pages = agent.store._db.execute("PRAGMA page_count").fetchone()[0]
            agent.store._db.execute(f"PRAGMA max_page_count = {pages}")
        second = live.add_event(type="Freeze", description="x" * 20_000)
        wait_until(lambda: approved_ids(live) == [first["EventId"], second["EventId"]])
        assert agent.store.degraded is not None and "full" in agent.store.degraded
        assert agent.thread is not None and agent.thread.is_alive()
    finally:
        agent.close()
    on_disk = Store(tmp_path / "state.db", read_only=True)
    try:
        record = on_disk.get(first["EventId"])
        assert record is not None and record.state == "approved"
    finally:
        on_disk.close()
    tried["full disk survived"] += 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop its own capabilities")
def test_a_read_only_state_directory_keeps_history_and_the_agent_going(
    live: Emulator, tmp_path: Path, tried: Counter[str]
) -> None:
    assert shutil.which("setpriv"), "setpriv (util-linux) is needed"
    tmp_path.chmod(0o755)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    first_run = AgentProcess(tmp_path, live.url, state={"path": str(state_dir / "state.db")})
    try:
        first = live.add_event(type="Reboot")
        wait_until(lambda: approved_ids(live) == [first["EventId"]], timeout=30)
    finally:
        assert first_run.stop() == 0
    before = (state_dir / "state.db").read_bytes()
    state_dir.chmod(0o555)
    # Root without CAP_DAC_OVERRIDE obeys file modes: the directory is now read-only to it.
    second_run = AgentProcess(
        tmp_path,
        live.url,
        prefix=("setpriv", "--bounding-set", "-all", "--inh-caps", "-all", "--"),
        state={"path": str(state_dir / "state.db")},
    )
    try:
        second = live.add_event(type="Freeze")
        wait_until(lambda: approved_ids(live) == [first["EventId"], second["EventId"]], timeout=30)
        assert second_run.alive()
    finally:
        assert second_run.stop() == 0
        state_dir.chmod(0o755)
    entries = log_entries(tmp_path / "agent.log")
    assert any(e["event"] == "state.degraded" for e in entries)
    # The first event, done before, was remembered (read from the file): not prepared again.
    prepared = [e for e in entries if e["event"] == "event.discovered"]
    assert [e["event_id"] for e in prepared] == [first["EventId"], second["EventId"]]
    assert (state_dir / "state.db").read_bytes() == before
    tried["read-only state directory survived"] += 1
