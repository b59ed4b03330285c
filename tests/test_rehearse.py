"""``rehearse``: the real hooks run for a synthetic event against a private emulator, and the
report says whether the prepare phase fits the notice; the real IMDS and state are untouched."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.test_cli_agent import agent

# Nothing listens here: a rehearsal that called the configured IMDS or ARM would fail.
NOWHERE = "http://127.0.0.1:9"


def hooks_config(directory: Path, prepare: str, recover: str, **extra: object) -> Path:
    for phase, body in (("prepare", prepare), ("recover", recover)):
        folder = directory / f"{phase}.d"
        folder.mkdir(mode=0o755)
        hook = folder / f"10-{phase}"
        hook.write_text(f"#!/bin/sh\n{body}\n")
        hook.chmod(0o755)
    data = {
        "imds": {"url": NOWHERE},
        "vm_name": "web_4",
        "hooks": {
            "prepare_dir": str(directory / "prepare.d"),
            "recover_dir": str(directory / "recover.d"),
        },
        "state": {"path": str(directory / "state.db")},
        "metrics": {"listen": None},
        "arm": {"url": NOWHERE},
        **extra,
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_rehearsal_runs_the_real_hooks_and_leaves_the_real_state_alone(tmp_path: Path) -> None:
    config = hooks_config(
        tmp_path,
        f'echo "$SCHEDULED_EVENT_TYPE $SCHEDULED_EVENT_PHASE" >> {tmp_path}/ran',
        f'echo "$SCHEDULED_EVENT_TYPE $SCHEDULED_EVENT_PHASE" >> {tmp_path}/ran',
    )
    completed = agent("rehearse", "--config", str(config), timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert (tmp_path / "ran").read_text().split("\n")[:2] == ["Preempt prepare", "Preempt recover"]
    out = completed.stdout
    assert "rehearsal: Preempt with 30 s of notice" in out
    assert "prepare hook 10-prepare: succeeded" in out
    assert "recover hook 10-recover: succeeded" in out
    assert "fits:" in out and "before NotBefore" in out
    assert "the agent would approve" in out
    assert not (tmp_path / "state.db").exists()


def test_a_prepare_phase_longer_than_the_notice_does_not_fit(tmp_path: Path) -> None:
    config = hooks_config(tmp_path, "sleep 3", "true")
    completed = agent("rehearse", "--config", str(config), "--type", "Preempt", "--notice", "1")
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "does NOT fit" in completed.stdout
    (result,) = json.loads(
        agent("rehearse", "--config", str(config), "--notice", "1", "--json", timeout=120).stdout
    )
    assert result["fits"] is False
    assert result["margin_seconds"] < 0


def test_all_types_gives_one_row_per_enabled_type(tmp_path: Path) -> None:
    config = hooks_config(tmp_path, "true", "true", events={"types": ["Freeze", "Preempt"]})
    completed = agent("rehearse", "--config", str(config), "--all-types", timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    header, *rows = completed.stdout.strip().splitlines()
    assert header.split()[:3] == ["type", "notice", "prepare"]
    assert [row.split()[0] for row in rows] == ["Freeze", "Preempt"]
    assert rows[0].split()[1] == "900s" and rows[1].split()[1] == "30s"
    assert all("fits, approve" in row for row in rows)


def test_an_unknown_type_is_a_usage_error(tmp_path: Path) -> None:
    config = hooks_config(tmp_path, "true", "true")
    completed = agent("rehearse", "--config", str(config), "--type", "Nap")
    assert completed.returncode == 2
    assert "--type must be one of" in completed.stderr
