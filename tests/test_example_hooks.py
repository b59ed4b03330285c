"""The example hooks in hooks/: they pass shellcheck, and the ones that need no outside system
do their job when run by the agent's own hook runner."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import structlog

from agent.clock import SystemClock
from agent.events import parse_document
from agent.hooks import SUCCEEDED, Hook, HookContext, HookRunner

HOOKS = Path(__file__).resolve().parent.parent / "hooks"
SCRIPTS = sorted(
    [*HOOKS.glob("prepare.d/*"), *HOOKS.glob("recover.d/*"), HOOKS / "lib" / "common.sh"]
)


def run_hook(path: Path, description: str = "Host server is undergoing maintenance.") -> Any:
    event = parse_document(
        {
            "DocumentIncarnation": 3,
            "Events": [
                {
                    "EventId": "A1B2",
                    "EventStatus": "Scheduled",
                    "EventType": "Reboot",
                    "Resources": ["web_4"],
                    "NotBefore": "",
                    "Description": description,
                }
            ],
        }
    ).events[0]
    stop = threading.Event()
    runner = HookRunner(SystemClock(stop), stop, structlog.get_logger(), kill_grace_seconds=1)
    deadline = datetime.now(timezone.utc) + timedelta(seconds=30)
    phase = "prepare" if path.parent.name == "prepare.d" else "recover"
    return runner.run(Hook(path.name, path), HookContext(phase, event, "web_4", 3, deadline))


@pytest.fixture(autouse=True)
def no_site_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOOKS_ENV", str(tmp_path / "no-hooks.env"))
    for name in ("WEBHOOK_URL", "STOP_SERVICES", "HAPROXY_BACKEND", "K8S_NODE_NAME"):
        monkeypatch.delenv(name, raising=False)


def test_every_example_hook_passes_shellcheck() -> None:
    assert shutil.which("shellcheck"), "shellcheck is needed (.ci/run installs it)"
    completed = subprocess.run(
        ["shellcheck", "-x", "-P", "SCRIPTDIR", "-s", "sh", *map(str, SCRIPTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout


def test_every_example_hook_is_executable_and_paired() -> None:
    prepare = sorted(path.name for path in HOOKS.glob("prepare.d/*"))
    recover = sorted(path.name for path in HOOKS.glob("recover.d/*"))
    assert len(prepare) == len(recover) == 5
    for path in [*HOOKS.glob("prepare.d/*"), *HOOKS.glob("recover.d/*")]:
        assert path.stat().st_mode & 0o111, path


def test_the_probe_flag_is_set_then_removed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    flag = tmp_path / "run" / "drain"
    monkeypatch.setenv("DRAIN_FLAG", str(flag))
    monkeypatch.setenv("LB_PROBE_WAIT_SECONDS", "0")
    assert run_hook(HOOKS / "prepare.d" / "20-lb-probe-down").outcome == SUCCEEDED
    assert flag.exists()
    # Idempotent: a second run (after a crash, say) succeeds too.
    assert run_hook(HOOKS / "prepare.d" / "20-lb-probe-down").outcome == SUCCEEDED
    assert run_hook(HOOKS / "recover.d" / "80-lb-probe-up").outcome == SUCCEEDED
    assert not flag.exists()
    assert run_hook(HOOKS / "recover.d" / "80-lb-probe-up").outcome == SUCCEEDED


@pytest.mark.parametrize(
    "name",
    [
        "prepare.d/30-haproxy-drain",
        "prepare.d/40-stop-service",
        "recover.d/60-start-service",
        "recover.d/70-haproxy-ready",
        "prepare.d/00-notify",
        "recover.d/99-notify",
    ],
)
def test_hooks_without_settings_do_nothing_and_succeed(name: str) -> None:
    assert run_hook(HOOKS / name).outcome == SUCCEEDED


class Webhook(BaseHTTPRequestHandler):
    received: ClassVar[list[Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Webhook.received.append(json.loads(body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    Webhook.received = []
    server = HTTPServer(("127.0.0.1", 0), Webhook)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()
    thread.join()


def test_the_notice_reaches_the_webhook_as_json_whatever_the_description(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, webhook: str
) -> None:
    monkeypatch.setenv("WEBHOOK_URL", webhook)
    marker = tmp_path / "pwned"
    hostile = f'"}}, "x": "$(touch {marker})`touch {marker}`\nnext line'
    assert run_hook(HOOKS / "prepare.d" / "00-notify", hostile).outcome == SUCCEEDED
    assert run_hook(HOOKS / "recover.d" / "99-notify").outcome == SUCCEEDED
    first, second = Webhook.received
    assert set(first) == {"text"}
    assert "A1B2" in first["text"] and hostile in first["text"]
    assert "over" in second["text"]
    assert not marker.exists()


def test_a_failing_hook_posts_a_failure_notice(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, webhook: str
) -> None:
    monkeypatch.setenv("WEBHOOK_URL", webhook)
    monkeypatch.setenv("STOP_SERVICES", "no-such-unit-for-the-test")
    # A systemctl that fails, first on PATH: the test must not touch the machine's services.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "systemctl").write_text('#!/bin/sh\necho "Unit $2 not loaded." >&2\nexit 5\n')
    (fake / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    result = run_hook(HOOKS / "prepare.d" / "40-stop-service")
    assert result.outcome == "failed"
    (notice,) = Webhook.received
    assert "40-stop-service failed with status 5" in notice["text"]
