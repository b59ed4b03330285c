"""Hooks as hooks/README.md says, with real scripts in a temporary directory."""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from agent.clock import SystemClock
from agent.events import ScheduledEvent, parse_document
from agent.hooks import (
    FAILED,
    INTERRUPTED,
    REFUSED,
    SUCCEEDED,
    TIMED_OUT,
    Hook,
    HookContext,
    HookRunner,
    deadline_for,
    discover,
)
from tests.conftest import wait_until

HOSTILE = "$(touch {marker}) `touch {marker}`; touch {marker}\ntouch {marker} && echo 'quoted\""


def make_event(**fields: Any) -> ScheduledEvent:
    raw = {
        "EventId": "28512AF7-C957-4500-9BC4-842D6FB531E4",
        "EventStatus": "Scheduled",
        "EventType": "Reboot",
        "ResourceType": "VirtualMachine",
        "Resources": ["web_4", "web_5"],
        "NotBefore": "Wed, 24 Jan 2018 21:20:44 GMT",
        "Description": "Host server is undergoing maintenance.",
        "EventSource": "Platform",
        "DurationInSeconds": -1,
    }
    raw.update(fields)
    return parse_document({"DocumentIncarnation": 5, "Events": [raw]}).events[0]


def script(directory: Path, name: str, body: str, mode: int = 0o755) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return path


def context_for(event: ScheduledEvent, seconds: float = 30, phase: str = "prepare") -> HookContext:
    deadline = datetime.now(timezone.utc) + timedelta(seconds=seconds)
    return HookContext(phase, event, "web_4", 5, deadline)


def runner(stop: threading.Event | None = None, **options: Any) -> HookRunner:
    stop = stop or threading.Event()
    options.setdefault("kill_grace_seconds", 1.0)
    options.setdefault("tempfail_retry_seconds", 0.05)
    return HookRunner(SystemClock(stop), stop, structlog.get_logger(), **options)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it is gone for our purpose once it is not running.
    status = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
    return status == "Z"


# Discovery ---------------------------------------------------------------------------------


def test_hooks_run_in_lexical_order_with_run_parts_skips(tmp_path: Path) -> None:
    for name in ["20-b", "10-a", "3-c", ".hidden", "x~", "a.dpkg-old", "b.rpmnew", "c.rpmsave"]:
        script(tmp_path, name, "exit 0\n")
    (tmp_path / "subdir").mkdir()
    script(tmp_path, "15-not-executable", "exit 0\n", mode=0o644)
    hooks = discover(tmp_path, check_ownership=False)
    assert [hook.name for hook in hooks] == ["10-a", "15-not-executable", "20-b", "3-c"]
    refusals = {hook.name: hook.refusal for hook in hooks}
    # Fails closed: a hook without its execute bit is refused (its phase fails), with the fix.
    refused = refusals.pop("15-not-executable")
    assert refused is not None and "chmod +x" in refused
    assert set(refusals.values()) == {None}


def test_an_empty_directory_holds_no_hooks(tmp_path: Path) -> None:
    script(tmp_path, ".disabled", "exit 0\n")
    assert discover(tmp_path, check_ownership=True) == []


@pytest.mark.parametrize("kind", ["missing", "a file", "unreadable"])
def test_a_hook_directory_that_cannot_be_listed_is_one_refused_hook(
    tmp_path: Path, kind: str
) -> None:
    directory = tmp_path / "prepare.d"
    if kind == "a file":
        directory.write_text("")
    elif kind == "unreadable":
        directory.mkdir(mode=0o000)
        if os.access(directory, os.R_OK):
            pytest.skip("this user reads any directory (root without dropped capabilities)")
    (hook,) = discover(directory, check_ownership=False)
    assert hook.path == directory
    assert hook.refusal is not None and str(directory) in hook.refusal


def test_as_root_a_hook_writable_by_others_is_refused(tmp_path: Path) -> None:
    script(tmp_path, "10-open", "exit 0\n", mode=0o757)
    script(tmp_path, "20-group", "exit 0\n", mode=0o775)
    script(tmp_path, "30-fine", "exit 0\n", mode=0o755)
    tmp_path.chmod(0o755)
    hooks = discover(tmp_path, check_ownership=True)
    refusals = {hook.name: hook.refusal for hook in hooks}
    assert refusals["30-fine"] is None
    assert refusals["10-open"] is not None and "chmod go-w" in refusals["10-open"]
    assert refusals["20-group"] is not None and str(tmp_path / "20-group") in refusals["20-group"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_as_root_a_hook_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = script(tmp_path, "10-theirs", "exit 0\n")
    os.chown(path, 1234, 1234)
    tmp_path.chmod(0o755)
    (hook,) = discover(tmp_path, check_ownership=True)
    assert hook.refusal is not None
    assert "uid 1234" in hook.refusal and "chown root" in hook.refusal


def test_as_root_a_hook_directory_writable_by_others_refuses_its_hooks(tmp_path: Path) -> None:
    directory = tmp_path / "prepare.d"
    script(directory, "10-a", "exit 0\n")
    directory.chmod(0o777)
    (hook,) = discover(directory, check_ownership=True)
    assert hook.refusal is not None and "hook directory" in hook.refusal


def test_a_refused_hook_fails_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = script(tmp_path, "10-a", f"touch {marker}\n")
    result = runner().run(Hook("10-a", path, "writable by others"), context_for(make_event()))
    assert result.outcome == REFUSED
    assert not marker.exists()


# Input -------------------------------------------------------------------------------------


def test_the_event_arrives_on_stdin_and_in_the_environment(tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = script(
        tmp_path / "hooks",
        "10-record",
        f"cat > {out}.json\nenv | grep ^SCHEDULED_EVENT_ | sort > {out}.env\n",
    )
    event = make_event(Extra="kept")
    context = context_for(event)
    result = runner().run(Hook("10-record", path), context)
    assert result.outcome == SUCCEEDED
    assert json.loads(Path(f"{out}.json").read_text()) == {
        "phase": "prepare",
        "vm_name": "web_4",
        "document_incarnation": 5,
        "event": event.to_wire(),
    }
    environment = dict(line.split("=", 1) for line in Path(f"{out}.env").read_text().splitlines())
    assert environment == {
        "SCHEDULED_EVENT_ID": "28512AF7-C957-4500-9BC4-842D6FB531E4",
        "SCHEDULED_EVENT_TYPE": "Reboot",
        "SCHEDULED_EVENT_STATUS": "Scheduled",
        "SCHEDULED_EVENT_SOURCE": "Platform",
        "SCHEDULED_EVENT_NOT_BEFORE": "2018-01-24T21:20:44Z",
        "SCHEDULED_EVENT_DURATION_SECONDS": "-1",
        "SCHEDULED_EVENT_RESOURCES": "web_4 web_5",
        "SCHEDULED_EVENT_DESCRIPTION": "Host server is undergoing maintenance.",
        "SCHEDULED_EVENT_PHASE": "prepare",
        "SCHEDULED_EVENT_VM_NAME": "web_4",
        "SCHEDULED_EVENT_DEADLINE": context.deadline.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def test_absent_fields_are_empty_strings(tmp_path: Path) -> None:
    out = tmp_path / "out.env"
    path = script(tmp_path / "hooks", "10-record", f"env | grep ^SCHEDULED_EVENT_ > {out}\n")
    raw = parse_document(
        {
            "DocumentIncarnation": 1,
            "Events": [
                {
                    "EventId": "a",
                    "EventStatus": "Started",
                    "EventType": "Reboot",
                    "Resources": ["web_4"],
                    "NotBefore": "",
                }
            ],
        }
    ).events[0]
    runner().run(Hook("10-record", path), context_for(raw))
    environment = dict(line.split("=", 1) for line in out.read_text().splitlines())
    for key in ("SOURCE", "NOT_BEFORE", "DURATION_SECONDS", "DESCRIPTION"):
        assert environment[f"SCHEDULED_EVENT_{key}"] == "", key


def test_a_hostile_description_is_passed_as_data_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    description = HOSTILE.format(marker=marker)
    out = tmp_path / "out"
    path = script(
        tmp_path / "hooks",
        "10-echo",
        f'printf "%s" "$SCHEDULED_EVENT_DESCRIPTION" > {out}.env\ncat > {out}.json\n',
    )
    event = make_event(Description=description, EventType=description)
    assert runner().run(Hook("10-echo", path), context_for(event)).outcome == SUCCEEDED
    assert not marker.exists()
    assert Path(f"{out}.env").read_text() == description
    assert json.loads(Path(f"{out}.json").read_text())["event"]["Description"] == description


def test_nul_bytes_and_lone_surrogates_do_not_stop_a_hook(tmp_path: Path) -> None:
    path = script(tmp_path / "hooks", "10-a", "cat > /dev/null\n")
    event = make_event(Description="a\x00b\ud800c")
    assert runner().run(Hook("10-a", path), context_for(event)).outcome == SUCCEEDED


# Exit status and deadline ------------------------------------------------------------------


def test_a_non_zero_exit_fails_with_its_status(tmp_path: Path) -> None:
    path = script(tmp_path, "10-a", "echo draining failed\nexit 3\n")
    result = runner().run(Hook("10-a", path), context_for(make_event()))
    assert (result.outcome, result.exit_status) == (FAILED, 3)
    assert result.output_tail == "draining failed\n"


def test_exit_75_runs_the_hook_again_until_it_is_ready(tmp_path: Path) -> None:
    count = tmp_path / "count"
    path = script(
        tmp_path / "hooks",
        "10-a",
        f'echo x >> {count}\n[ "$(wc -l < {count})" -ge 3 ] && exit 0\nexit 75\n',
    )
    result = runner().run(Hook("10-a", path), context_for(make_event()))
    assert (result.outcome, result.attempts) == (SUCCEEDED, 3)


def test_exit_75_until_the_deadline_fails(tmp_path: Path) -> None:
    path = script(tmp_path, "10-a", "exit 75\n")
    result = runner().run(Hook("10-a", path), context_for(make_event(), seconds=0.5))
    assert result.outcome == TIMED_OUT
    assert result.attempts > 1


def test_the_deadline_stops_the_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    path = script(tmp_path / "hooks", "10-a", f"sleep 300 &\necho $! > {pids}\nsleep 300\n")
    result = runner().run(Hook("10-a", path), context_for(make_event(), seconds=1))
    assert result.outcome == TIMED_OUT
    child = int(pids.read_text())
    wait_until(lambda: process_gone(child))


def test_a_hook_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    path = script(tmp_path, "10-a", "trap '' TERM\nwhile true; do sleep 0.1; done\n")
    result = runner(kill_grace_seconds=0.5).run(
        Hook("10-a", path), context_for(make_event(), seconds=0.5)
    )
    assert result.outcome == TIMED_OUT
    assert result.exit_status is not None and result.exit_status < 0


def test_children_left_holding_the_output_are_killed_when_the_hook_exits(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    path = script(tmp_path / "hooks", "10-a", f"sleep 300 &\necho $! > {pids}\nexit 0\n")
    result = runner().run(Hook("10-a", path), context_for(make_event()))
    assert result.outcome == SUCCEEDED
    wait_until(lambda: process_gone(int(pids.read_text())))


def test_the_stop_flag_interrupts_a_running_hook(tmp_path: Path) -> None:
    started = tmp_path / "started"
    path = script(tmp_path / "hooks", "10-a", f"touch {started}\nsleep 300\n")
    stop = threading.Event()
    results = []
    thread = threading.Thread(
        target=lambda: results.append(
            runner(stop).run(Hook("10-a", path), context_for(make_event()))
        )
    )
    thread.start()
    wait_until(started.exists)
    stop.set()
    thread.join(timeout=10)
    assert results[0].outcome == INTERRUPTED


def test_a_hook_that_cannot_start_fails_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "10-bad"
    path.write_text("#!/no/such/interpreter\n")
    path.chmod(0o755)
    result = runner().run(Hook("10-bad", path), context_for(make_event()))
    assert result.outcome == FAILED
    assert "cannot be started" in result.output_tail


def test_a_hook_that_closes_stdin_at_once_still_succeeds(tmp_path: Path) -> None:
    path = script(tmp_path, "10-a", "exec 0<&-\necho done\n")
    big = make_event(Description="x" * 1_000_000)
    assert runner().run(Hook("10-a", path), context_for(big)).outcome == SUCCEEDED


# Output ------------------------------------------------------------------------------------


def test_every_output_line_is_logged_with_hook_and_event(tmp_path: Path) -> None:
    path = script(tmp_path, "10-a", "echo one\necho two >&2\nprintf three\n")
    with capture_logs() as logs:
        runner().run(Hook("10-a", path), context_for(make_event()))
    lines = [entry for entry in logs if entry["event"] == "hook.output"]
    assert [entry["line"] for entry in lines] == ["one", "two", "three"]
    assert {entry["hook"] for entry in lines} == {"10-a"}
    assert {entry["event_id"] for entry in lines} == {"28512AF7-C957-4500-9BC4-842D6FB531E4"}


def test_a_flood_of_output_is_logged_up_to_a_bound_and_its_tail_kept(tmp_path: Path) -> None:
    path = script(tmp_path, "10-a", "seq 1 5000\n")
    with capture_logs() as logs:
        result = runner().run(Hook("10-a", path), context_for(make_event()))
    lines = [entry for entry in logs if entry["event"] == "hook.output"]
    assert len(lines) == 1000
    (truncated,) = [entry for entry in logs if entry["event"] == "hook.output_truncated"]
    assert truncated["lines_not_logged"] == 4000
    assert result.output_tail.endswith("4999\n5000\n")
    assert len(result.output_tail) <= 4096


# Deadline arithmetic -----------------------------------------------------------------------


def test_a_prepare_deadline_is_the_earlier_of_timeout_and_not_before() -> None:
    now = datetime(2018, 1, 24, 21, 10, 0, tzinfo=timezone.utc)
    event = make_event()  # NotBefore 21:20:44
    assert deadline_for("prepare", event, now, 60) == now + timedelta(seconds=60)
    assert deadline_for("prepare", event, now, 3600) == event.not_before
    # Recover hooks and past NotBefores get the whole timeout.
    assert deadline_for("recover", event, now, 3600) == now + timedelta(seconds=3600)
    later = datetime(2018, 1, 24, 22, 0, 0, tzinfo=timezone.utc)
    assert deadline_for("prepare", event, later, 60) == later + timedelta(seconds=60)
