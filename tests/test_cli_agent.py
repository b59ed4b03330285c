"""The agent's commands as real processes: run --once/--dry-run, check-config, status, history,
approve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from tests.agent_harness import calls, config_for
from tests.conftest import Emulator, approved_ids, wait_until

ROOT = Path(__file__).resolve().parent.parent


def write_config(directory: Path, url: str, **sections: Any) -> Path:
    data = config_for(directory, url, **sections)
    data["logging"] = {"format": "json"}
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def agent(*arguments: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def log_events(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


# check-config ------------------------------------------------------------------------------


def test_check_config_accepts_the_example_file_and_checks_the_paths_it_names(
    tmp_path: Path,
) -> None:
    example = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    completed = agent("check-config", "--config", str(ROOT / "config.example.yaml"))
    # Its keys are all valid; its paths are those of an installed agent, absent here.
    for key in ("hooks.prepare_dir", "hooks.recover_dir"):
        missing = not Path(example["hooks"][key.split(".")[1]]).is_dir()
        assert (key in completed.stderr) == missing, completed.stderr
    config = write_config(tmp_path, "http://127.0.0.1:9")
    completed = agent("check-config", "--config", str(config))
    assert completed.returncode == 0, completed.stderr
    assert "valid" in completed.stdout


def test_check_config_reports_each_path_problem_with_its_fix(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, "http://127.0.0.1:9", hooks={"recover_dir": str(tmp_path / "recover.typo")}
    )
    (tmp_path / "prepare.d" / "10-record").chmod(0o644)
    (tmp_path / "prepare.d" / "20-dir-is-not-a-hook").mkdir()
    (tmp_path / "prepare.d" / "30-notes~").write_text("")
    completed = agent("check-config", "--config", str(config))
    assert completed.returncode == 2
    problems = [line for line in completed.stderr.splitlines() if "check-config:" in line]
    assert len(problems) == 2, completed.stderr
    assert "hooks.prepare_dir" in problems[0] and "chmod +x" in problems[0]
    assert "hooks.recover_dir" in problems[1] and "does not exist" in problems[1]


@pytest.mark.skipif(os.geteuid() != 0, reason="the ownership checks apply when run as root")
def test_check_config_as_root_refuses_hooks_others_may_change(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9")
    tmp_path.chmod(0o755)
    (tmp_path / "prepare.d" / "10-record").chmod(0o777)
    (tmp_path / "recover.d").chmod(0o777)
    (tmp_path / "recover.d" / "10-record").unlink()
    completed = agent("check-config", "--config", str(config))
    assert completed.returncode == 2
    assert "chmod go-w" in completed.stderr
    assert str(tmp_path / "recover.d") in completed.stderr


def test_check_config_says_when_the_state_directory_is_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    config = write_config(tmp_path, "http://127.0.0.1:9", state={"path": str(blocker / "state.db")})
    completed = agent("check-config", "--config", str(config))
    assert completed.returncode == 2
    assert "state.path" in completed.stderr and str(blocker) in completed.stderr


@pytest.mark.skipif(
    Path("/etc/scheduled-events-agent/config.yaml").exists(),
    reason="this machine has an installed configuration",
)
def test_check_config_without_a_file_says_the_defaults_apply_and_checks_them() -> None:
    completed = agent("check-config")
    assert "no file there: the defaults apply" in completed.stdout
    if not Path("/etc/scheduled-events-agent/prepare.d").is_dir():
        assert completed.returncode == 2
        assert "/etc/scheduled-events-agent/prepare.d" in completed.stderr


def test_check_config_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("imds:\n  poll_interval_seconds: -1\napproval:\n  mode: maybe\ncolour: red\n")
    completed = agent("check-config", "--config", str(path))
    assert completed.returncode == 2
    for key in ("imds.poll_interval_seconds", "approval.mode", "colour"):
        assert key in completed.stderr
    assert "Traceback" not in completed.stderr


def test_a_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    completed = agent("run", "--once", "--config", str(tmp_path / "nope.yaml"))
    assert completed.returncode == 2
    assert "not found" in completed.stderr


# run ---------------------------------------------------------------------------------------


def test_run_once_handles_one_poll_fully_and_exits(live: Emulator, tmp_path: Path) -> None:
    config = write_config(tmp_path, live.url)
    event = live.add_event(type="Reboot")
    completed = agent("run", "--once", "--config", str(config))
    assert completed.returncode == 0, completed.stderr
    assert approved_ids(live) == [event["EventId"]]
    assert calls(tmp_path) == [
        f"start prepare Reboot {event['EventId']}",
        f"end prepare Reboot {event['EventId']}",
    ]
    names = [entry["event"] for entry in log_events(completed.stderr)]
    assert names.index("event.discovered") < names.index("event.approved")


def test_run_reads_the_vm_name_from_instance_metadata(
    start_emulator: Callable[..., Emulator], tmp_path: Path
) -> None:
    emulator = start_emulator(real_time=True, vm_name="web_7")
    data = config_for(tmp_path, emulator.url)
    del data["vm_name"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    mine = emulator.add_event(type="Reboot", resources=["web_7"])
    emulator.add_event(type="Reboot", resources=["web_4"])
    completed = agent("run", "--once", "--config", str(path))
    assert completed.returncode == 0, completed.stderr
    assert approved_ids(emulator) == [mine["EventId"]]


def test_run_dry_run_posts_nothing_and_runs_nothing(live: Emulator, tmp_path: Path) -> None:
    config = write_config(tmp_path, live.url)
    live.add_event(type="Reboot")
    completed = agent("run", "--once", "--dry-run", "--config", str(config))
    assert completed.returncode == 0, completed.stderr
    assert approved_ids(live) == []
    assert calls(tmp_path) == []
    names = {entry["event"] for entry in log_events(completed.stderr)}
    assert {"hook.would_run", "event.would_approve"} <= names


def test_run_once_exits_1_when_imds_cannot_be_read(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9")
    completed = agent("run", "--once", "--config", str(config), timeout=120)
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr


def test_the_daemon_stops_cleanly_on_sigterm(live: Emulator, tmp_path: Path) -> None:
    config = write_config(tmp_path, live.url)
    with (tmp_path / "out.log").open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: "agent.started" in (tmp_path / "out.log").read_text(), timeout=30)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert "agent.stopped" in (tmp_path / "out.log").read_text()


# status, history, approve ------------------------------------------------------------------


def test_status_and_history_show_what_was_done(live: Emulator, tmp_path: Path) -> None:
    config = write_config(tmp_path, live.url)
    event = live.add_event(type="Reboot", description="Host server is undergoing maintenance.")
    other = live.add_event(type="Freeze", resources=["web_9"])
    assert agent("run", "--once", "--config", str(config)).returncode == 0

    status = agent("status", "--config", str(config), "--json")
    assert status.returncode == 0, status.stderr
    (pending,) = json.loads(status.stdout)["events"]
    assert pending["event_id"] == event["EventId"]
    assert pending["state"] == "approved"
    assert [hook["outcome"] for hook in pending["hooks"]] == ["succeeded"]
    assert [approval["outcome"] for approval in pending["approvals"]] == ["succeeded"]

    text = agent("status", "--config", str(config)).stdout
    assert event["EventId"] in text and "approved" in text

    history = json.loads(agent("history", "--config", str(config), "--json").stdout)
    assert {entry["event_id"] for entry in history} == {event["EventId"], other["EventId"]}
    limited = json.loads(agent("history", "--config", str(config), "--json", "--limit", "1").stdout)
    assert len(limited) == 1
    assert "10-record" in agent("history", "--config", str(config)).stdout


def test_status_works_while_the_daemon_runs(live: Emulator, tmp_path: Path) -> None:
    (tmp_path / "block-prepare-Reboot").touch()
    config = write_config(tmp_path, live.url)
    with (tmp_path / "out.log").open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            event = live.add_event(type="Reboot")
            wait_until((tmp_path / "pid-prepare-Reboot").exists, timeout=30)
            status = agent("status", "--config", str(config), "--json")
            assert status.returncode == 0, status.stderr
            (pending,) = json.loads(status.stdout)["events"]
            assert pending["event_id"] == event["EventId"]
            assert pending["state"] == "preparing"
            assert pending["hooks"][0]["outcome"] == "running or cut short"
        finally:
            (tmp_path / "block-prepare-Reboot").unlink()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0


def test_a_second_run_with_the_same_state_file_exits_2_naming_the_pid(
    live: Emulator, tmp_path: Path
) -> None:
    (tmp_path / "block-prepare-Reboot").touch()
    config = write_config(tmp_path, live.url)
    with (tmp_path / "out.log").open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            live.add_event(type="Reboot")
            wait_until((tmp_path / "pid-prepare-Reboot").exists, timeout=30)
            for command in (["run"], ["run", "--once"]):
                second = agent(*command, "--config", str(config))
                assert second.returncode == 2, second.stderr
                assert f"PID {process.pid}" in second.stderr
            # The hook was started once: the second agent never touched the event.
            assert [line for line in calls(tmp_path) if line.startswith("start")] == [
                line for line in calls(tmp_path) if line.startswith("start prepare")
            ][:1]
            for command in ("status", "history"):
                assert agent(command, "--config", str(config)).returncode == 0
        finally:
            (tmp_path / "block-prepare-Reboot").unlink()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
    # Once the first has stopped, the lock is free again.
    assert agent("run", "--once", "--config", str(config)).returncode == 0


def test_status_before_any_run_says_so(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9")
    completed = agent("status", "--config", str(config))
    assert completed.returncode == 1
    assert "does not exist yet" in completed.stderr


def test_approve_by_hand_posts_once_and_is_recorded(live: Emulator, tmp_path: Path) -> None:
    config = write_config(tmp_path, live.url)
    event = live.add_event(type="Reboot", event_id="28512af7-c957-4500-9bc4-842d6fb531e4")
    completed = agent("approve", event["EventId"].upper(), "--config", str(config))
    assert completed.returncode == 0, completed.stderr
    assert approved_ids(live) == [event["EventId"]]  # echoed as received, not as typed
    again = agent("approve", event["EventId"], "--config", str(config))
    assert again.returncode == 1
    assert approved_ids(live) == [event["EventId"]]


def test_approve_refuses_a_shared_event_without_force(live: Emulator, tmp_path: Path) -> None:
    config = write_config(tmp_path, live.url)
    shared = live.add_event(type="Reboot", resources=["web_4", "web_5"])
    refused = agent("approve", shared["EventId"], "--config", str(config))
    assert refused.returncode == 2
    assert "web_5" in refused.stderr and "--force" in refused.stderr
    assert approved_ids(live) == []
    forced = agent("approve", shared["EventId"], "--config", str(config), "--force")
    assert forced.returncode == 0, forced.stderr
    assert approved_ids(live) == [shared["EventId"]]


def test_the_daemon_does_not_post_an_event_approved_by_hand(live: Emulator, tmp_path: Path) -> None:
    config = write_config(tmp_path, live.url, approval={"mode": "never"})
    event = live.add_event(type="Reboot", co_tenant_approvals=1)
    assert agent("approve", event["EventId"], "--config", str(config)).returncode == 0
    write_config(tmp_path, live.url)
    assert agent("run", "--once", "--config", str(config)).returncode == 0
    assert approved_ids(live) == [event["EventId"]]


def test_approve_an_unknown_event_names_the_ones_there(live: Emulator, tmp_path: Path) -> None:
    config = write_config(tmp_path, live.url)
    present = live.add_event(type="Freeze")
    completed = agent("approve", "nope", "--config", str(config))
    assert completed.returncode == 1
    assert present["EventId"] in completed.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the ownership check applies when run as root")
def test_as_root_a_world_writable_hook_is_refused_and_blocks_approval(
    live: Emulator, tmp_path: Path
) -> None:
    config = write_config(tmp_path, live.url)
    (tmp_path / "prepare.d" / "10-record").chmod(0o777)
    live.add_event(type="Reboot")
    completed = agent("run", "--once", "--config", str(config))
    assert completed.returncode == 0
    assert approved_ids(live) == []
    refused = [e for e in log_events(completed.stderr) if e["event"] == "hook.refused"]
    assert refused and "chmod go-w" in refused[0]["reason"]


def test_check_config_names_a_hook_type_entry_that_is_no_hook(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        hooks={"event_types": {"10-record": ["Reboot"], "50-k8s-drian": ["Reboot"]}},
    )
    completed = agent("check-config", "--config", str(config))
    assert completed.returncode == 2
    problems = [line for line in completed.stderr.splitlines() if "check-config:" in line]
    assert len(problems) == 1, completed.stderr
    assert "hooks.event_types: 50-k8s-drian is no hook" in problems[0]


def test_check_config_prints_a_hostile_hook_name_escaped(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9")
    (tmp_path / "prepare.d" / "20-\x1b]0;owned\x07").write_text("not executable")
    completed = agent("check-config", "--config", str(config))
    assert completed.returncode == 2
    assert "\x1b" not in completed.stderr and "20-\\x1b]0;owned\\x07" in completed.stderr
