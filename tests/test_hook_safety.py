"""Hooks run as root by the agent as a real process: the file checked is the file run, a hook
gets only what it needs, and what documents carry reaches the terminal escaped."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.errors import StateError
from agent.state import Store
from tests.agent_harness import config_for
from tests.conftest import Emulator, approved_ids, wait_until

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the ownership checks apply when the agent runs as root"
)

SECRET = "sv=2026-01-01&sig=SECRET-SAS-TOKEN"


class Agent:
    """``scheduled-events-agent run`` as a child process, logging JSON to agent.log."""

    def __init__(
        self, directory: Path, live: Emulator, environment: dict[str, str], **sections: Any
    ) -> None:
        data = config_for(directory, live.url, recording_hooks=False, **sections)
        data["logging"] = {"format": "json"}
        self.config = directory / "config.yaml"
        self.config.write_text(yaml.safe_dump(data))
        self.directory = directory
        self.log_path = directory / "agent.log"
        self.log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **environment},
        )

    def command(self, *arguments: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "agent", *arguments, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout

    def state(self, event_id: str) -> str | None:
        try:
            store = Store(self.directory / "state.db", read_only=True)
        except StateError:
            return None  # the agent has not created its store yet
        try:
            record = store.get(event_id)
            return record.state if record else None
        except StateError:
            return None  # the file exists, its tables are not written yet
        finally:
            store.close()

    def hook_runs(self, event_id: str) -> list[Any]:
        store = Store(self.directory / "state.db", read_only=True)
        try:
            return list(store.hook_runs(event_id.lower()))
        finally:
            store.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    running: list[Agent] = []
    yield running
    for agent in running:
        if agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait()
        agent.log.close()


def hook(path: Path, body: str, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return path


def directories(tmp_path: Path) -> dict[str, Any]:
    for name in ("prepare.d", "recover.d"):
        (tmp_path / name).mkdir(exist_ok=True)
    return {"prepare_dir": str(tmp_path / "prepare.d"), "recover_dir": str(tmp_path / "recover.d")}


def test_a_hook_swapped_while_an_earlier_one_runs_never_runs(
    live: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    """The review's attack: prepare.d/20-link points at a root-owned 0755 file in a directory
    `nobody` owns. While 10-first runs, `nobody` swaps the file for something of its choice:
    here a link to a root-owned program that must not run (think /sbin/reboot), which a check
    of the file alone finds root's and 0755."""
    nobody = pwd.getpwnam("nobody").pw_uid
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, nobody, -1)
    hook(foreign / "target", f"id -u > {tmp_path}/target-ran\n")
    dangerous = hook(tmp_path / "sbin" / "dangerous", f"id -u > {tmp_path}/dangerous-ran\n")
    hooks = directories(tmp_path)
    hook(
        tmp_path / "prepare.d" / "10-first",
        f"touch {tmp_path}/first-started\nwhile [ ! -e {tmp_path}/go ]; do sleep 0.05; done\n",
    )
    (tmp_path / "prepare.d" / "20-link").symlink_to(foreign / "target")
    agents.append(agent := Agent(tmp_path, live, {}, hooks=hooks))
    event = live.add_event(type="Reboot", not_before_in_seconds=120)
    wait_until((tmp_path / "first-started").exists, timeout=30)
    # As nobody may, in its own directory: a new entry, renamed over the target.
    swap = foreign / ".swap"
    swap.symlink_to(dangerous)
    os.lchown(swap, nobody, -1)
    swap.rename(foreign / "target")
    (tmp_path / "go").touch()
    wait_until(lambda: agent.state(event["EventId"]) == "waiting", timeout=30)
    assert not (tmp_path / "dangerous-ran").exists()
    assert not (tmp_path / "target-ran").exists()
    runs = {run.hook: run for run in agent.hook_runs(event["EventId"])}
    assert runs["10-first"].outcome == "succeeded"
    assert runs["20-link"].outcome == "refused"
    assert (
        f"directory {foreign} on its path is owned by uid {nobody}" in runs["20-link"].output_tail
    )
    assert approved_ids(live) == []
    agent.stop()


def test_hooks_never_see_the_agent_s_secrets(
    live: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    hooks = directories(tmp_path)
    hook(tmp_path / "prepare.d" / "10-env", f"env | tee {tmp_path}/hook-env\n")
    hooks.update(
        pass_environment=["KUBECONFIG"], environment={"HTTPS_PROXY": "http://127.0.0.1:3128"}
    )
    secrets = {
        "SCHEDULED_EVENTS_AGENT_FLEET_SAS_TOKEN": SECRET,
        "SCHEDULED_EVENTS_AGENT_FLEET_ACCOUNT_KEY": "U0VDUkVULUFDQ09VTlQtS0VZ",
        "KUBECONFIG": "/etc/kubernetes/admin.conf",
    }
    agents.append(agent := Agent(tmp_path, live, secrets, hooks=hooks))
    event = live.add_event(type="Reboot", not_before_in_seconds=120)
    wait_until(lambda: approved_ids(live) == [event["EventId"]], timeout=30)
    seen = (tmp_path / "hook-env").read_text()
    status = agent.command("status", "--json")
    agent.stop()
    for where in (seen, status, agent.log_path.read_text()):
        assert SECRET not in where
        assert "U0VDUkVULUFDQ09VTlQtS0VZ" not in where
        assert "SCHEDULED_EVENTS_AGENT_" not in where
    assert "KUBECONFIG=/etc/kubernetes/admin.conf" in seen.splitlines()
    assert "HTTPS_PROXY=http://127.0.0.1:3128" in seen.splitlines()
    assert "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in seen.splitlines()


def test_status_and_history_print_control_characters_escaped(
    live: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    hooks = directories(tmp_path)
    hook(tmp_path / "prepare.d" / "10-echo", "printf 'title \\033]0;owned\\007 here\\n'\n")
    agents.append(agent := Agent(tmp_path, live, {}, hooks=hooks))
    hostile = "\x1b]0;owned\x07\x1b[2J"
    event = live.add_event(type="Reboot", not_before_in_seconds=120, resources=["web_4", hostile])
    wait_until(lambda: agent.state(event["EventId"]) == "waiting", timeout=30)  # shared: kept
    status, history = agent.command("status"), agent.command("history")
    as_json = json.loads(agent.command("status", "--json"))
    agent.stop()
    for text in (status, history):
        assert "\x1b" not in text and "\x07" not in text
        assert "\\x1b]0;owned\\x07\\x1b[2J" in text
    # JSON keeps the exact value, escaped by JSON itself.
    assert as_json["events"][0]["resources"] == ["web_4", hostile]
    assert "\\x1b]0;owned" not in json.dumps(as_json["events"][0]["hooks"][0]["output_tail"])
