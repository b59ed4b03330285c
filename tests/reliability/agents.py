"""The agent as a real process for the fault suite, and helpers to read what it did."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from agent.errors import StateError
from agent.state import Store
from tests.agent_harness import config_for


class AgentProcess:
    def __init__(
        self,
        directory: Path,
        imds_url: str,
        *,
        prefix: tuple[str, ...] = (),
        recording_hooks: bool = True,
        failpoints: str = "",
        **sections: Any,
    ) -> None:
        data = config_for(directory, imds_url, recording_hooks=recording_hooks, **sections)
        data["logging"] = {"format": "json"}
        self.config = directory / "config.yaml"
        self.config.write_text(yaml.safe_dump(data))
        self.log_path = directory / "agent.log"
        self.log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={
                **{key: value for key, value in os.environ.items() if "FAILPOINT" not in key},
                **({"SCHEDULED_EVENTS_AGENT_FAILPOINTS": failpoints} if failpoints else {}),
            },
        )

    def logs(self) -> list[dict[str, Any]]:
        """The JSON lines the agent wrote so far (other lines, a traceback say, are kept as
        ``{"event": "not-json", "line": ...}``)."""
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                lines.append({"event": "not-json", "line": line})
        return lines

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)
        self.log.close()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout=60)
        self.log.close()
        return status

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


def stored_state(directory: Path, event_id: str) -> str | None:
    path = directory / "state.db"
    if not path.exists():
        return None
    try:
        store = Store(path, read_only=True)
    except StateError:
        return None
    try:
        record = store.get(event_id)
        return record.state if record else None
    except StateError:
        return None  # the agent is still creating its tables
    finally:
        store.close()
