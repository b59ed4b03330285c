"""Hooks as hooks/README.md says, with real scripts in a temporary directory."""

from __future__ import annotations

import json
import os
import pwd
import re
import resource
import signal
import subprocess
import sys
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
    SHEPHERD,
    SUCCEEDED,
    TIMED_OUT,
    Hook,
    HookContext,
    HookRunner,
    HooksUnavailable,
    deadline_for,
    discover,
    hook_environment,
    open_hook,
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
        "SCHEDULED_EVENT_HOOK_PATH": str(path),
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


# The file checked is the file run -------------------------------------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the ownership checks apply when the agent runs as root"
)


def nobody() -> int:
    return pwd.getpwnam("nobody").pw_uid


def marker_script(path: Path, marker: Path, mode: int = 0o755) -> Path:
    path.write_text(f"#!/bin/sh\nid -u > {marker}\n")
    path.chmod(mode)
    return path


@needs_root
def test_a_symlink_into_a_directory_another_user_owns_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, nobody(), -1)
    marker_script(foreign / "target", tmp_path / "ran")
    hooks = tmp_path / "prepare.d"
    hooks.mkdir()
    (hooks / "20-link").symlink_to(foreign / "target")
    (hook,) = discover(hooks, check_ownership=True)
    assert hook.refusal is not None
    assert f"directory {foreign} on its path is owned by uid {nobody()}" in hook.refusal
    assert f"chown root {foreign}" in hook.refusal
    result = runner(check_ownership=True).run(
        Hook("20-link", hooks / "20-link"), context_for(make_event())
    )
    assert result.outcome == REFUSED
    assert not (tmp_path / "ran").exists()


@needs_root
def test_a_hook_is_checked_again_when_it_is_run(tmp_path: Path) -> None:
    """Safe when the phase was planned, unsafe by the time it runs: refused, never run."""
    hooks = tmp_path / "prepare.d"
    hooks.mkdir()
    target = tmp_path / "lib"
    target.mkdir()
    marker_script(target / "hook", tmp_path / "ran")
    (hooks / "20-link").symlink_to(target / "hook")
    (hook,) = discover(hooks, check_ownership=True)
    assert hook.refusal is None
    # Meanwhile (while an earlier hook ran) the directory holding the file was given away,
    # and its new owner put its own world-writable script in place.
    os.chown(target, nobody(), -1)
    replacement = target / ".new"
    marker_script(replacement, tmp_path / "replaced", mode=0o777)
    os.chown(replacement, nobody(), -1)
    replacement.rename(target / "hook")
    result = runner(check_ownership=True).run(hook, context_for(make_event()))
    assert result.outcome == REFUSED
    assert f"directory {target} on its path is owned by uid {nobody()}" in result.output_tail
    assert not (tmp_path / "replaced").exists()
    assert not (tmp_path / "ran").exists()


@needs_root
def test_a_shared_sticky_directory_is_safe_only_for_roots_entries(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    hooks = tmp_path / "prepare.d"
    hooks.mkdir()
    marker_script(shared / "root-hook", tmp_path / "ran")
    (hooks / "10-root").symlink_to(shared / "root-hook")
    foreign = marker_script(shared / "their-hook", tmp_path / "theirs")
    os.chown(foreign, nobody(), -1)
    (hooks / "20-theirs").symlink_to(foreign)
    theirs_link = shared / "their-link"
    theirs_link.symlink_to(shared / "root-hook")
    os.lchown(theirs_link, nobody(), -1)
    (hooks / "30-their-link").symlink_to(theirs_link)
    found = {hook.name: hook.refusal for hook in discover(hooks, check_ownership=True)}
    assert found["10-root"] is None
    assert found["20-theirs"] is not None and "inside the shared directory" in found["20-theirs"]
    assert found["30-their-link"] is not None and "owned by uid" in found["30-their-link"]


@needs_root
def test_a_hook_directory_anyone_may_write_refuses_its_hooks(tmp_path: Path) -> None:
    hooks = tmp_path / "prepare.d"
    script(hooks, "10-a", "exit 0\n")
    hooks.chmod(0o777)
    (hook,) = discover(hooks, check_ownership=True)
    assert hook.refusal is not None and f"chmod go-w {hooks}" in hook.refusal


def test_what_runs_is_the_descriptor_that_was_checked(tmp_path: Path) -> None:
    """Replacing the file between the check and the exec changes nothing: the shepherd
    executes the descriptor opened for the check."""
    path = marker_script(tmp_path / "10-a", tmp_path / "original")
    fd, refusal = open_hook(path, check_ownership=os.geteuid() == 0)
    assert fd is not None, refusal
    try:
        marker_script(tmp_path / ".swap", tmp_path / "swapped").rename(path)
        status_read, status_write = os.pipe()
        shepherd = subprocess.run(
            [sys.executable, "-I", "-S", SHEPHERD, str(fd), str(status_write), "1", str(path)],
            pass_fds=(fd, status_write),
            env=hook_environment(),
            timeout=30,
            check=False,
        )
        os.close(status_write)
        report = json.loads(os.read(status_read, 4096))
        os.close(status_read)
    finally:
        os.close(fd)
    assert shepherd.returncode == 0
    assert report == {"wait_status": 0, "killed": 0}
    assert (tmp_path / "original").exists()
    assert not (tmp_path / "swapped").exists()


# A hook gets only what it needs ---------------------------------------------------------------


def test_hooks_get_a_clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHEDULED_EVENTS_AGENT_FLEET_SAS_TOKEN", "sv=secret-sas")
    monkeypatch.setenv("SCHEDULED_EVENTS_AGENT_FLEET_ACCOUNT_KEY", "secret-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-hooks")
    monkeypatch.setenv("KUBECONFIG", "/etc/kubernetes/admin.conf")
    monkeypatch.setenv("PATH", f"{tmp_path}/evil:/usr/bin:/bin")
    monkeypatch.setenv("TZ", "Europe/Berlin")
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    out = tmp_path / "env"
    path = script(tmp_path / "hooks", "10-a", f"env > {out}\n")
    environment = hook_environment(
        ["KUBECONFIG", "NOT_SET"], {"HTTPS_PROXY": "http://127.0.0.1:3128"}
    )
    result = runner(environment=environment).run(Hook("10-a", path), context_for(make_event()))
    assert result.outcome == SUCCEEDED
    seen = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert "secret" not in out.read_text()
    assert not [name for name in seen if name.startswith("SCHEDULED_EVENTS_AGENT_")]
    assert "AWS_SECRET_ACCESS_KEY" not in seen and "NOT_SET" not in seen
    assert seen["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert seen["KUBECONFIG"] == "/etc/kubernetes/admin.conf"
    assert seen["HTTPS_PROXY"] == "http://127.0.0.1:3128"
    assert seen["TZ"] == "Europe/Berlin" and seen["LANG"] == "de_DE.UTF-8"
    assert seen["HOME"] == pwd.getpwuid(os.geteuid()).pw_dir
    assert seen["SCHEDULED_EVENT_TYPE"] == "Reboot"
    # What is left is the shell's own (PWD, SHLVL, _) and the locale: nothing else of the agent's.
    shell = {"PWD", "SHLVL", "_", "OLDPWD"}
    assert {name for name in seen if not name.startswith("LC_")} - shell == {
        "PATH",
        "LANG",
        "TZ",
        "HOME",
        "USER",
        "LOGNAME",
        "KUBECONFIG",
        "HTTPS_PROXY",
        *(name for name in seen if name.startswith("SCHEDULED_EVENT_")),
    }


def test_the_agent_s_variables_cannot_be_configured_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SCHEDULED_EVENTS_AGENT_FLEET_SAS_TOKEN", "sv=secret")
    environment = hook_environment(
        ["SCHEDULED_EVENTS_AGENT_FLEET_SAS_TOKEN"], {"SCHEDULED_EVENT_ID": "forged"}
    )
    assert "SCHEDULED_EVENTS_AGENT_FLEET_SAS_TOKEN" not in environment
    assert "SCHEDULED_EVENT_ID" not in environment


def test_the_json_on_stdin_is_one_line_ending_with_a_newline(tmp_path: Path) -> None:
    out = tmp_path / "line"
    # `read` fails (status 1) at an end of input without a newline, and `set -e` fails the hook.
    path = script(tmp_path, "10-a", f"set -e\nread -r line\nprintf '%s' \"$line\" > {out}\n")
    result = runner().run(Hook("10-a", path), context_for(make_event()))
    assert result.outcome == SUCCEEDED, result.output_tail
    assert json.loads(out.read_text())["event"]["EventType"] == "Reboot"


# A finished hook leaves nothing behind --------------------------------------------------------

ESCAPE = (
    "setsid sh -c 'echo $$ > {pid}.tmp; mv {pid}.tmp {pid}; sleep 7; echo LEAKED; exec sleep 25'"
    " &\nwhile [ ! -s {pid} ]; do sleep 0.01; done\n"
)


def test_a_child_escaped_into_a_new_session_is_killed_when_the_hook_ends(tmp_path: Path) -> None:
    pid = tmp_path / "escaped"
    path = script(tmp_path / "hooks", "10-a", ESCAPE.format(pid=pid) + "exit 0\n")
    with capture_logs() as logs:
        result = runner().run(Hook("10-a", path), context_for(make_event()))
    assert result.outcome == SUCCEEDED
    escaped = int(pid.read_text())
    assert process_gone(escaped)  # at once: the run does not end before its children
    (killed,) = [entry for entry in logs if entry["event"] == "hook.descendants_killed"]
    assert killed["count"] == 2  # the escaped shell and its sleep
    assert "LEAKED" not in result.output_tail


def test_escaped_children_of_a_stopped_hook_get_sigterm_then_sigkill(tmp_path: Path) -> None:
    pid = tmp_path / "escaped"
    body = (
        'setsid sh -c \'trap "" TERM; echo $$ > {pid}.tmp; mv {pid}.tmp {pid};'
        " while :; do sleep 0.1; done' &\nwhile [ ! -s {pid} ]; do sleep 0.01; done\nsleep 300\n"
    )
    path = script(tmp_path / "hooks", "10-a", body.format(pid=pid))
    result = runner(kill_grace_seconds=0.5).run(
        Hook("10-a", path), context_for(make_event(), seconds=1)
    )
    assert result.outcome == TIMED_OUT
    assert process_gone(int(pid.read_text()))


def test_each_hook_s_output_is_its_own(tmp_path: Path) -> None:
    """10-a leaves a process holding its output; 20-b's lines are 20-b's, every one."""
    hooks = tmp_path / "hooks"
    first = script(hooks, "10-a", ESCAPE.format(pid=tmp_path / "escaped") + "exit 0\n")
    lines = [f"b-line-{number}" for number in range(1, 7)]
    body = "sleep 2.5\n" + "".join(f"echo {line}\nsleep 0.5\n" for line in lines)
    second = script(hooks, "20-b", body)
    hook_runner = runner()
    with capture_logs() as logs:
        results = [
            hook_runner.run(Hook("10-a", first), context_for(make_event())),
            hook_runner.run(Hook("20-b", second), context_for(make_event())),
        ]
    assert [result.outcome for result in results] == [SUCCEEDED, SUCCEEDED]
    output = [(entry["hook"], entry["line"]) for entry in logs if entry["event"] == "hook.output"]
    assert output == [("20-b", line) for line in lines]
    assert results[1].output_tail == "".join(f"{line}\n" for line in lines)


def test_a_hook_that_cannot_be_executed_says_why(tmp_path: Path) -> None:
    path = tmp_path / "10-a"
    path.write_text("no interpreter line\n")
    path.chmod(0o755)
    result = runner().run(Hook("10-a", path), context_for(make_event()))
    assert result.outcome == FAILED
    assert re.search(r"cannot be started: Exec format error", result.output_tail)


AS_NOBODY = """#!{python}
import os, pwd, time
child = os.fork()
if child == 0:
    os.setsid()
    os.setgid(pwd.getpwnam("nobody").pw_gid)
    os.setuid(pwd.getpwnam("nobody").pw_uid)
    os.execvp("sleep", ["sleep", "300"])
with open("{pid}", "w") as file:
    file.write(str(child))
while open(f"/proc/{{child}}/cmdline", "rb").read() != b"sleep\\x00300\\x00":
    time.sleep(0.01)
"""


@needs_root
def test_a_descendant_running_as_another_user_is_killed_too(tmp_path: Path) -> None:
    pid = tmp_path / "escaped"
    path = tmp_path / "hooks" / "10-a"
    path.parent.mkdir()
    path.write_text(AS_NOBODY.format(python=sys.executable, pid=pid))
    path.chmod(0o755)
    result = runner(check_ownership=True).run(Hook("10-a", path), context_for(make_event()))
    assert result.outcome == SUCCEEDED, result.output_tail
    escaped = int(pid.read_text())
    assert process_gone(escaped)


def test_a_hook_starts_with_no_signal_ignored(tmp_path: Path) -> None:
    out = tmp_path / "status"
    path = script(tmp_path, "10-a", f"grep SigIgn /proc/$$/status > {out}\n")
    assert runner().run(Hook("10-a", path), context_for(make_event())).outcome == SUCCEEDED
    # The standard signals (1 to 31); the real-time ones glibc keeps for itself are left as
    # the agent's parent set them.
    ignored = int(out.read_text().split()[1], 16) & 0x7FFFFFFF
    assert not ignored & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1))
    # Nothing more ignored than in a shell subprocess starts (which restores those two).
    shell = subprocess.run(
        ["sh", "-c", "grep SigIgn /proc/$$/status"], capture_output=True, text=True, check=True
    )
    assert ignored == int(shell.stdout.split()[1], 16) & 0x7FFFFFFF


def test_a_hook_that_stops_its_shepherd_still_leaves_nothing_behind(tmp_path: Path) -> None:
    pid = tmp_path / "escaped"
    body = ESCAPE.format(pid=pid) + "kill -STOP $PPID\nexit 0\n"
    path = script(tmp_path / "hooks", "10-a", body)
    result = runner(kill_grace_seconds=0.5).run(
        Hook("10-a", path), context_for(make_event(), seconds=1)
    )
    assert result.outcome == TIMED_OUT
    wait_until(lambda: process_gone(int(pid.read_text())))


@needs_root
def test_a_link_to_a_directory_another_user_owns_is_refused_not_skipped(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    (foreign / "real").mkdir(parents=True)
    os.chown(foreign, nobody(), -1)
    hooks = tmp_path / "prepare.d"
    hooks.mkdir()
    (hooks / "10-drain").symlink_to(foreign / "real")
    (hook,) = discover(hooks, check_ownership=True)
    assert hook.refusal is not None and f"directory {foreign}" in hook.refusal


@needs_root
def test_an_empty_hook_directory_another_user_owns_fails_its_phase(tmp_path: Path) -> None:
    hooks = tmp_path / "prepare.d"
    hooks.mkdir()
    os.chown(hooks, nobody(), -1)
    (hook,) = discover(hooks, check_ownership=True)
    assert hook.refusal is not None and f"owned by uid {nobody()}" in hook.refusal


@needs_root
def test_dot_dot_after_a_link_is_checked_where_the_kernel_goes(tmp_path: Path) -> None:
    trusted = tmp_path / "t"
    (trusted / "prepare.d").mkdir(parents=True)
    foreign = tmp_path / "nob"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "prepare.d").mkdir()
    os.chown(foreign, nobody(), -1)
    os.chown(foreign / "prepare.d", nobody(), -1)
    (trusted / "link").symlink_to(foreign / "sub")
    (hook,) = discover(trusted / "link" / ".." / "prepare.d", check_ownership=True)
    assert hook.refusal is not None and "owned by uid" in hook.refusal


def test_running_out_of_descriptors_is_no_refused_hook_but_an_error_to_retry(
    tmp_path: Path,
) -> None:
    # A refused hook fails its phase for good; a full descriptor table passes (the worker
    # retries): a real EMFILE, with the soft limit lowered to the descriptors open now.
    (tmp_path / "10-ok").write_text("#!/bin/sh\n")
    (tmp_path / "10-ok").chmod(0o755)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The limit bounds descriptor numbers: at the lowest free one, any new open fails.
    lowest_free = os.open(os.devnull, os.O_RDONLY)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        with pytest.raises(HooksUnavailable):
            discover(tmp_path, check_ownership=False)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert [hook.refusal for hook in discover(tmp_path, check_ownership=False)] == [None]
