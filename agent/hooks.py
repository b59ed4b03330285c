"""Hooks: find them as run-parts does, and run one by argv with a deadline (hooks/README.md).

Invariants:
- Hooks run in lexical (byte) order of file name; names starting with ``.``, ending in ``~``, or
  holding ``.dpkg-`` or ``.rpm`` are skipped. Configuration fails closed: a missing or
  unreadable hook directory, or a file in it that is not executable, is a refused hook, and a
  refused hook fails its phase.
- A hook is run by argv, never through a shell; event fields reach it only as data (JSON on stdin
  and ``SCHEDULED_EVENT_*`` variables), so a hostile Description is never executed.
- Each hook runs in its own session (process group). When stopped (deadline or agent shutdown)
  the whole group gets SIGTERM, then SIGKILL after the grace period. Processes the hook leaves
  behind holding its output open are killed when it exits, so nothing outlives a run unseen.
- Every output line is logged with the hook's name and the event id, up to a bound per run;
  the last few KiB are kept for the state store. Memory stays bounded whatever a hook prints.
- Exit 0 succeeded; 75 (EX_TEMPFAIL) runs the hook again after a delay until the deadline;
  anything else, a signal or the deadline failed.
- Variables are cut to 32 KiB (the kernel refuses longer ones); stdin carries every value whole.
- When the agent runs as root, a hook or hook directory writable by group or others, or owned
  by a user other than root, is refused with an error that names the file and the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

from agent.clock import Clock
from agent.events import ScheduledEvent

EX_TEMPFAIL = 75
MAX_LOGGED_LINES = 1000
MAX_LINE_CHARS = 2000
TAIL_BYTES = 4096
MAX_ENVIRONMENT_BYTES = 32 * 1024

SUCCEEDED = "succeeded"
FAILED = "failed"
TIMED_OUT = "timed_out"
REFUSED = "refused"
INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class Hook:
    """A hook file found in a hook directory; ``refusal`` says why it may not run, if so."""

    name: str
    path: Path
    refusal: str | None = None


@dataclass(frozen=True)
class HookResult:
    name: str
    outcome: str
    exit_status: int | None
    attempts: int
    output_tail: str
    started_at: datetime
    ended_at: datetime

    @property
    def succeeded(self) -> bool:
        return self.outcome == SUCCEEDED


@dataclass(frozen=True)
class HookContext:
    """What a hook is told about: the phase, the event, this VM, and the run's deadline."""

    phase: str
    event: ScheduledEvent
    vm_name: str
    document_incarnation: int
    deadline: datetime

    def stdin_json(self) -> bytes:
        payload = {
            "phase": self.phase,
            "vm_name": self.vm_name,
            "document_incarnation": self.document_incarnation,
            "event": self.event.to_wire(),
        }
        return json.dumps(payload).encode("ascii")

    def environment(self) -> dict[str, str]:
        event = self.event
        values = {
            "SCHEDULED_EVENT_ID": event.event_id,
            "SCHEDULED_EVENT_TYPE": event.event_type,
            "SCHEDULED_EVENT_STATUS": event.status,
            "SCHEDULED_EVENT_SOURCE": event.source or "",
            "SCHEDULED_EVENT_NOT_BEFORE": iso_utc(event.not_before) if event.not_before else "",
            "SCHEDULED_EVENT_DURATION_SECONDS": (
                "" if event.duration_seconds is None else str(event.duration_seconds)
            ),
            "SCHEDULED_EVENT_RESOURCES": " ".join(event.resources),
            "SCHEDULED_EVENT_DESCRIPTION": event.description or "",
            "SCHEDULED_EVENT_PHASE": self.phase,
            "SCHEDULED_EVENT_VM_NAME": self.vm_name,
            "SCHEDULED_EVENT_DEADLINE": iso_utc(self.deadline),
        }
        return {key: _environment_safe(value) for key, value in values.items()}


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_skipped_name(name: str) -> bool:
    """run-parts rules: editor backups, hidden files and package-manager leftovers."""
    return name.startswith(".") or name.endswith("~") or ".dpkg-" in name or ".rpm" in name


def discover(directory: Path, *, check_ownership: bool) -> list[Hook]:
    """The hooks of ``directory`` in run order; an existing, empty directory holds none.

    Fails closed: a directory that is missing or cannot be read becomes one refused hook named
    after it, and so does a file that is not an executable regular file. A refused hook fails
    its phase (and so holds back the approval) with a reason that says the fix.
    """
    try:
        names = sorted(os.listdir(directory))
    except OSError as error:
        if isinstance(error, FileNotFoundError):
            why = "does not exist (create it, or correct the path in hooks.*_dir)"
        elif isinstance(error, NotADirectoryError):
            why = "is not a directory (point hooks.*_dir at a directory of hooks)"
        else:
            why = f"cannot be read: {error.strerror} (check its permissions)"
        return [Hook(str(directory), directory, f"hook directory {directory} {why}")]
    directory_refusal = ownership_problem(directory, "hook directory") if check_ownership else None
    hooks: list[Hook] = []
    for name in names:
        path = directory / name
        if is_skipped_name(name):
            continue
        try:
            info = path.stat()
        except OSError as error:
            hooks.append(
                Hook(name, path, f"hook {path} cannot be read: {error.strerror} (remove or fix it)")
            )
            continue
        if stat.S_ISDIR(info.st_mode):
            continue
        refusal = directory_refusal
        if not stat.S_ISREG(info.st_mode):
            refusal = f"hook {path} is not a regular file (remove it from the hook directory)"
        elif not os.access(path, os.X_OK):
            refusal = (
                f"hook {path} is not executable: chmod +x {path} to run it, or rename it"
                " with a leading '.' or a trailing '~' to leave it out"
            )
        if refusal is None and check_ownership:
            refusal = ownership_problem(path, "hook")
        hooks.append(Hook(name, path, refusal))
    return hooks


def ownership_problem(path: Path, what: str) -> str | None:
    try:
        info = path.stat()
    except OSError as error:
        return f"{what} {path} cannot be checked: {error.strerror}"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} {path} is writable by group or others (chmod go-w {path})"
    if info.st_uid not in (0, os.geteuid()):
        return f"{what} {path} is owned by uid {info.st_uid}, not root (chown root {path})"
    return None


def _environment_safe(value: str) -> str:
    # The environment cannot carry NUL bytes or lone surrogates, and Linux refuses a variable
    # over 128 KiB; stdin always has the exact, whole value.
    safe = value.replace("\x00", "").encode("utf-8", "replace")[:MAX_ENVIRONMENT_BYTES]
    return safe.decode("utf-8", "ignore")


class HookRunner:
    """Runs one hook to completion. Collaborators passed in: clock, stop flag, logger."""

    def __init__(
        self,
        clock: Clock,
        stop: threading.Event,
        log: Any,
        *,
        kill_grace_seconds: float = 10.0,
        tempfail_retry_seconds: float = 5.0,
    ) -> None:
        self._clock = clock
        self._stop = stop
        self._log = log
        self._grace = kill_grace_seconds
        self._tempfail_retry = tempfail_retry_seconds

    def run(
        self,
        hook: Hook,
        context: HookContext,
        deadline_of: Callable[[], datetime] | None = None,
        on_start: Callable[[int], None] | None = None,
    ) -> HookResult:
        """Run ``hook`` to its end. ``deadline_of``, when given, is asked again while the hook
        runs: a NotBefore that moves moves the deadline of the running hook too. ``on_start``
        is told each started process's PID (its process group), so that a crash leaves a
        record of what may still run."""
        started_at = self._clock.now()
        log = self._log.bind(hook=hook.name, event_id=context.event.event_id, phase=context.phase)
        if hook.refusal is not None:
            log.error("hook.refused", reason=hook.refusal)
            return HookResult(hook.name, REFUSED, None, 0, hook.refusal, started_at, started_at)
        told = context.deadline

        def deadline() -> float:
            nonlocal told
            target = context.deadline if deadline_of is None else deadline_of()
            if target != told:
                told = target
                log.info("hook.deadline_moved", deadline=iso_utc(target))
            return self._clock.monotonic() + (target - self._clock.now()).total_seconds()

        attempts = 0
        tail: deque[str] = deque()
        while True:
            attempts += 1
            log.info("hook.started", attempt=attempts, deadline=iso_utc(context.deadline))
            outcome, status = self._run_once(hook, context, deadline, log, tail, on_start=on_start)
            if outcome != "tempfail":
                break
            wait = min(self._tempfail_retry, deadline() - self._clock.monotonic())
            log.info("hook.not_ready", exit_status=status, retry_in_seconds=round(wait, 2))
            if wait <= 0:
                outcome = TIMED_OUT
                break
            if self._clock.wait(wait):
                outcome = INTERRUPTED
                break
        ended_at = self._clock.now()
        duration = (ended_at - started_at).total_seconds()
        result = HookResult(
            hook.name, outcome, status, attempts, "".join(tail), started_at, ended_at
        )
        event = "hook.finished" if outcome == SUCCEEDED else "hook.failed"
        (log.info if outcome == SUCCEEDED else log.error)(
            event,
            outcome=outcome,
            exit_status=status,
            attempts=attempts,
            duration_seconds=round(duration, 3),
        )
        return result

    def _run_once(
        self,
        hook: Hook,
        context: HookContext,
        deadline: Callable[[], float],
        log: Any,
        tail: deque[str],
        *,
        on_start: Callable[[int], None] | None = None,
    ) -> tuple[str, int | None]:
        if deadline() - self._clock.monotonic() <= 0:
            return TIMED_OUT, None
        environment = {**os.environ, **context.environment()}
        try:
            process = subprocess.Popen(
                [str(hook.path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd="/",
                start_new_session=True,  # its own process group, so we can stop all of it
                close_fds=True,
            )
        except OSError as error:
            message = f"hook '{hook.name}' cannot be started: {error.strerror} ({hook.path})"
            log.error("hook.start_failed", reason=message)
            tail.clear()
            tail.append(message)
            return FAILED, None
        assert process.stdin is not None and process.stdout is not None
        if on_start is not None:
            on_start(process.pid)
        exited = threading.Event()
        threads = [
            threading.Thread(target=_feed, args=(process.stdin, context.stdin_json()), daemon=True),
            threading.Thread(target=_pump, args=(process.stdout, log, tail), daemon=True),
            threading.Thread(target=_reap, args=(process, exited), daemon=True),
        ]
        for thread in threads:
            thread.start()
        outcome: str | None = None
        while not exited.wait(min(max(deadline() - self._clock.monotonic(), 0.0), 0.25)):
            if self._clock.monotonic() >= deadline():
                outcome = TIMED_OUT
            elif self._stop.is_set():
                outcome = INTERRUPTED
            else:
                continue
            log.warning("hook.stopping", reason=outcome, pid=process.pid)
            self._stop_group(process.pid, exited)
            break
        # Whatever the hook left behind holding its output open goes with it.
        threads[1].join(timeout=0.5)
        if threads[1].is_alive():
            _kill_group(process.pid, signal.SIGKILL)
            threads[1].join(timeout=5)
        process.stdout.close()
        status = process.returncode
        if outcome is not None:
            return outcome, status
        if status == 0:
            return SUCCEEDED, status
        if status == EX_TEMPFAIL:
            return "tempfail", status
        return FAILED, status

    def _stop_group(self, pid: int, exited: threading.Event) -> None:
        _kill_group(pid, signal.SIGTERM)
        if not exited.wait(self._grace):
            _kill_group(pid, signal.SIGKILL)
            exited.wait()


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), to tell it from a reused PID."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat_file:
            fields = stat_file.read().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def stop_orphan(pid: int, started: str | None, grace_seconds: float, clock: Clock) -> bool:
    """Stop what is left of a hook run by an agent that died: its process group ``pid``.

    The kernel never hands out a PID that is still some group's id, so while group ``pid``
    has live members they are that hook's; if its leader is alive with another start time, the
    PID was reused after the group ended, and nothing is touched. Zombies (already dead, not
    yet reaped) do not count. True when something was stopped."""
    leader = process_start(pid)
    if leader is not None and started is not None and leader != started:
        return False
    if not _group_alive(pid):
        return False
    _kill_group(pid, signal.SIGTERM)
    deadline = clock.monotonic() + grace_seconds
    while clock.monotonic() < deadline:
        if not _group_alive(pid):
            return True
        clock.wait(0.05)
    _kill_group(pid, signal.SIGKILL)
    return True


def _group_alive(group: int) -> bool:
    """Whether process group ``group`` has a member that is not a zombie."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as stat_file:
                fields = stat_file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        if len(fields) > 2 and fields[2] == str(group) and fields[0] not in ("Z", "X"):
            return True
    return False


def _kill_group(pid: int, signal_number: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
        os.killpg(pid, signal_number)


def _feed(stream: IO[bytes], data: bytes) -> None:
    # A hook may close its stdin without reading it: its choice, not an error.
    with contextlib.suppress(OSError):
        stream.write(data)
    with contextlib.suppress(OSError):
        stream.close()


def _reap(process: subprocess.Popen[bytes], exited: threading.Event) -> None:
    process.wait()
    exited.set()


def _pump(stream: IO[bytes], log: Any, tail: deque[str]) -> None:
    """Log each output line (up to a bound) and keep the last TAIL_BYTES of output."""
    logged = 0
    dropped = 0
    pending = b""
    tail_size = sum(len(line) for line in tail)
    fd = stream.fileno()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        if chunk:
            pending += chunk
            lines = pending.split(b"\n")
            pending = lines.pop()
            if len(pending) > MAX_LINE_CHARS:
                lines.append(pending)
                pending = b""
        else:
            lines = [pending] if pending else []
        for raw in lines:
            text = raw[:MAX_LINE_CHARS].decode("utf-8", "replace").rstrip("\r")
            if logged < MAX_LOGGED_LINES:
                log.info("hook.output", line=text)
                logged += 1
            else:
                dropped += 1
            tail.append(text + "\n")
            tail_size += len(text) + 1
            while tail_size > TAIL_BYTES and len(tail) > 1:
                tail_size -= len(tail.popleft())
        if not chunk:
            break
    if dropped:
        log.warning("hook.output_truncated", lines_not_logged=dropped)


def deadline_for(
    phase: str,
    event: ScheduledEvent,
    now: datetime,
    timeout_seconds: float,
) -> datetime:
    """The earlier of now + timeout and NotBefore (prepare only, and only while ahead)."""
    deadline = now + timedelta(seconds=timeout_seconds)
    not_before = event.not_before
    if phase == "prepare" and not_before is not None and now < not_before < deadline:
        return not_before
    return deadline
