"""Hooks: find them as run-parts does, and run one by argv with a deadline (hooks/README.md).

Invariants:
- Hooks run in lexical (byte) order of file name; names starting with ``.``, ending in ``~``, or
  holding ``.dpkg-`` or ``.rpm`` are skipped. Configuration fails closed: a missing or
  unreadable hook directory, or a file in it that is not executable, is a refused hook, and a
  refused hook fails its phase.
- The file checked is the file run. A hook is checked each time it is started, through its
  resolved path, and the descriptor opened for the check is what is executed (``fexecve``):
  renaming or replacing the file on disk after the check changes nothing. When the agent runs
  as root, the hook and every directory its path goes through (symbolic links followed) must be
  owned by root and not writable by group or others; a sticky directory such as /tmp may be
  shared if the entry taken from it is root's. Anything else is refused with the fix.
- A hook is run by argv, never through a shell; event fields reach it only as data (JSON on
  stdin, ending with a newline, and ``SCHEDULED_EVENT_*`` variables), so a hostile Description
  is never executed. Its environment is built from nothing: a fixed PATH, the locale, TZ, HOME,
  the event's variables and what ``hooks.pass_environment`` and ``hooks.environment`` list;
  none of the agent's own variables (fleet secrets among them).
- Each hook runs under a shepherd (agent/shepherd.py), in its own session: the shepherd is the
  subreaper of everything the hook starts, even in a new session, and kills all of it when the
  hook exits. Stopping a run (deadline or agent shutdown) sends SIGTERM to all of it, SIGKILL
  after the grace period. Nothing a hook starts outlives its run.
- Every output line is logged with the hook's name and the event id, up to a bound per run;
  the last few KiB are kept for the state store. Memory stays bounded whatever a hook prints.
  The threads that read a run's output and write its stdin end with the run and close their
  own descriptors, so no descriptor number is read after another run reuses it.
- Exit 0 succeeded; 75 (EX_TEMPFAIL) runs the hook again after a delay until the deadline;
  anything else, a signal or the deadline failed.
- Variables are cut to 32 KiB (the kernel refuses longer ones); stdin carries every value whole.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import select
import signal
import stat
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from agent.clock import Clock
from agent.errors import AgentError
from agent.events import ScheduledEvent

EX_TEMPFAIL = 75
MAX_LOGGED_LINES = 1000
MAX_LINE_CHARS = 2000
TAIL_BYTES = 4096
MAX_ENVIRONMENT_BYTES = 32 * 1024
MAX_SYMLINKS = 40
# The shepherd is the hook's parent; the agent waits this much longer than the grace period it
# gives the shepherd before it kills the run's whole process group itself.
SHEPHERD_MARGIN_SECONDS = 5.0
SHEPHERD = str(Path(__file__).with_name("shepherd.py"))
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Variables of the agent's own that the configuration may not hand to hooks.
AGENT_PREFIX = "SCHEDULED_EVENTS_AGENT_"
HOOK_PREFIX = "SCHEDULED_EVENT_"
LOCALE_NAMES = (
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_NUMERIC",
    "LC_TIME",
    "LC_COLLATE",
    "LC_MONETARY",
    "LC_MESSAGES",
)

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
        # One line, ended with a newline, so that ``read -r line`` in a shell hook gets it.
        return json.dumps(payload).encode("ascii") + b"\n"

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


# The system is short of something for now (descriptors, memory): no verdict on a hook.
_TRANSIENT = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN, errno.EINTR)


class HooksUnavailable(AgentError):
    """The hooks cannot be looked at now (the process ran out of descriptors, say): not a
    refusal, which would fail the phase for good, but an error the event's work retries."""


def _transient(error: OSError, what: Path) -> None:
    if error.errno in _TRANSIENT:
        raise HooksUnavailable(f"{what} cannot be read now: {error.strerror}") from None


def discover(directory: Path, *, check_ownership: bool) -> list[Hook]:
    """The hooks of ``directory`` in run order; an existing, empty directory holds none.

    Fails closed: a directory that is missing or cannot be read becomes one refused hook named
    after it, and so does a file that is not an executable regular file. A refused hook fails
    its phase (and so holds back the approval) with a reason that says the fix. The same checks
    are made again when each hook is started (``open_hook``).
    """
    try:
        names = sorted(os.listdir(directory))
    except OSError as error:
        _transient(error, directory)
        if isinstance(error, FileNotFoundError):
            why = "does not exist (create it, or correct the path in hooks.*_dir)"
        elif isinstance(error, NotADirectoryError):
            why = "is not a directory (point hooks.*_dir at a directory of hooks)"
        else:
            why = f"cannot be read: {error.strerror} (check its permissions)"
        return [Hook(str(directory), directory, f"hook directory {directory} {why}")]
    directory_refusal = directory_problem(directory) if check_ownership else None
    hooks: list[Hook] = []
    for name in names:
        path = directory / name
        if is_skipped_name(name):
            continue
        with contextlib.suppress(OSError):
            # A directory in the hook directory is skipped; a link to one is not (it is refused:
            # whoever owns its target could otherwise make a hook vanish).
            if stat.S_ISDIR(os.lstat(path).st_mode):
                continue
        refusal = directory_refusal
        if refusal is None:
            fd, refusal = open_hook(path, check_ownership=check_ownership)
            if fd is not None:
                os.close(fd)
        hooks.append(Hook(name, path, refusal))
    if not hooks and directory_refusal is not None:
        # An untrusted directory holding no hook fails its phase too: its owner emptied it.
        return [Hook(str(directory), directory, directory_refusal)]
    return hooks


def open_hook(path: Path, *, check_ownership: bool) -> tuple[int, None] | tuple[None, str]:
    """A descriptor of the hook file at ``path``, opened and checked; or why it may not run.

    The descriptor (close-on-exec, read-only) is what the shepherd executes, so the file run is
    the file checked. With ``check_ownership`` (the agent runs as root), every directory the
    path goes through, symbolic links followed, must be safe from other users too
    (``_resolve_trusted``), and the file must be root's and not writable by group or others.
    """
    if check_ownership:
        resolved, problem = _resolve_trusted(path)
        if problem is not None:
            return None, f"hook {path}: {problem}"
        assert resolved is not None
        target, expected = resolved
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    else:
        target, expected = str(path), None
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(target, flags)
    except OSError as error:
        _transient(error, path)
        return None, f"hook {path} cannot be read: {error.strerror} (remove or fix it)"
    problem = _file_problem(fd, path, target, expected, check_ownership=check_ownership)
    if problem is not None:
        os.close(fd)
        return None, problem
    return fd, None


def _file_problem(
    fd: int,
    path: Path,
    target: str,
    expected: os.stat_result | None,
    *,
    check_ownership: bool,
) -> str | None:
    info = os.fstat(fd)
    shown = str(path) if target == str(path) else f"{path} (that is {target})"
    if expected is not None and (info.st_dev, info.st_ino) != (expected.st_dev, expected.st_ino):
        return f"hook {shown} was replaced while it was being checked (try again)"
    if not stat.S_ISREG(info.st_mode):
        return f"hook {shown} is not a regular file (remove it from the hook directory)"
    if not os.access(f"/proc/self/fd/{fd}", os.X_OK):
        return (
            f"hook {shown} is not executable: chmod +x {target} to run it, or rename {path}"
            " with a leading '.' or a trailing '~' to leave it out"
        )
    if check_ownership:
        if info.st_uid not in (0, os.geteuid()):
            return f"hook {shown} is owned by uid {info.st_uid}, not root (chown root {target})"
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"hook {shown} is writable by group or others (chmod go-w {target})"
    return None


def directory_problem(directory: Path) -> str | None:
    """Why hooks in ``directory`` may not run as root (see ``_resolve_trusted``), or None."""
    resolved, problem = _resolve_trusted(directory)
    if problem is not None:
        return f"hook directory {directory}: {problem}"
    assert resolved is not None
    target, info = resolved
    if not stat.S_ISDIR(info.st_mode):
        return f"hook directory {directory} is not a directory"
    problem = _unsafe_directory(target, info)
    return None if problem is None else f"hook directory {directory}: {problem}"


def _trusted(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _shared(info: os.stat_result) -> bool:
    """A directory others may write in, safe only because it is sticky (like /tmp)."""
    return bool(info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)) and bool(info.st_mode & stat.S_ISVTX)


def _unsafe_directory(path: str, info: os.stat_result) -> str | None:
    if not _trusted(info.st_uid):
        return (
            f"directory {path} on its path is owned by uid {info.st_uid}, not root"
            f" (chown root {path})"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        return f"directory {path} on its path is writable by group or others (chmod go-w {path})"
    return None


def _resolve_trusted(
    path: Path,
) -> tuple[tuple[str, os.stat_result], None] | tuple[None, str]:
    """Follow ``path`` as the kernel would, one component at a time, checking every directory
    it goes through, as sudo and OpenSSH's StrictModes do: each must be owned by root and not
    writable by group or others, except a sticky one (like /tmp), whose entry taken must then
    be root's. A directory another user can write in lets them swap the file.

    Returns the resolved path with what lstat says of it, or the problem."""
    # Not os.path.abspath: it folds "link/.." as text, where the kernel follows the link first.
    absolute = os.path.join(os.getcwd(), path)
    pending = [part for part in absolute.split("/") if part]
    current = "/"
    try:
        info = os.lstat(current)
    except OSError as error:
        return None, f"/ cannot be checked: {error.strerror}"
    problem = _unsafe_directory(current, info)
    if problem is not None:
        return None, problem
    shared = _shared(info)
    links = 0
    while pending:
        name = pending.pop(0)
        if name == ".":
            continue
        entry = os.path.dirname(current) if name == ".." else os.path.join(current, name)
        try:
            info = os.lstat(entry)
        except OSError as error:
            return None, f"{entry} cannot be checked: {error.strerror}"
        if shared and name != ".." and not _trusted(info.st_uid):
            return None, (
                f"{entry} is owned by uid {info.st_uid} inside the shared directory {current}"
                f" (chown root {entry}, or keep hooks out of {current})"
            )
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                return None, "its path has too many symbolic links"
            target = os.readlink(entry)
            pending[:0] = [part for part in target.split("/") if part]
            if target.startswith("/"):
                entry = "/"
                info = os.lstat(entry)
            else:
                continue  # resolved from the same directory, already checked
        elif not pending:
            return (entry, info), None
        if not stat.S_ISDIR(info.st_mode):
            return None, f"{entry} on its path is not a directory"
        problem = _unsafe_directory(entry, info)
        if problem is not None:
            return None, problem
        current, shared = entry, _shared(info)
    return (current, os.lstat(current)), None


def hook_environment(
    pass_through: Collection[str] = (),
    fixed: Mapping[str, str] | None = None,
    source: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment every hook starts from, built from nothing.

    A fixed PATH; the locale (LANG, LC_*) and TZ when the agent has them, LANG=C.UTF-8 when
    not; HOME, USER and LOGNAME of the user the agent runs as; then the names in
    ``pass_through`` that ``source`` (the agent's environment) has, and last the ``fixed``
    values. The agent's own variables are never taken (the configuration refuses them too).
    """
    source = os.environ if source is None else source
    environment = {"PATH": SAFE_PATH}
    for name in (*LOCALE_NAMES, "TZ"):
        if source.get(name):
            environment[name] = source[name]
    environment.setdefault("LANG", "C.UTF-8")
    with contextlib.suppress(KeyError):
        user = pwd.getpwuid(os.geteuid())
        environment.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    for name in pass_through:
        if name in source and not name.startswith((AGENT_PREFIX, HOOK_PREFIX)):
            environment[name] = source[name]
    for name, value in (fixed or {}).items():
        if not name.startswith((AGENT_PREFIX, HOOK_PREFIX)):
            environment[name] = value
    return environment


def _environment_safe(value: str) -> str:
    # The environment cannot carry NUL bytes or lone surrogates, and Linux refuses a variable
    # over 128 KiB; stdin always has the exact, whole value.
    safe = value.replace("\x00", "").encode("utf-8", "replace")[:MAX_ENVIRONMENT_BYTES]
    return safe.decode("utf-8", "ignore")


@dataclass(frozen=True)
class _Run:
    """One run of a hook (its tries of EX_TEMPFAIL included), as HookRunner.run was asked."""

    hook: Hook
    context: HookContext
    deadline: Callable[[], float]  # monotonic seconds, asked again as it may move
    log: Any
    tail: deque[str]
    on_start: Callable[[int], None] | None


@dataclass
class _Started:
    """A shepherd started, with the agent's ends of its stdin, output and status pipes."""

    process: subprocess.Popen[bytes]
    stdin: int
    output: int
    status: int


class HookRunner:
    """Runs one hook to completion. Collaborators passed in: clock, stop flag, logger.

    ``environment`` is what every hook starts from (``hook_environment``); ``check_ownership``
    turns on the checks made when the agent runs as root (``open_hook``)."""

    def __init__(
        self,
        clock: Clock,
        stop: threading.Event,
        log: Any,
        *,
        kill_grace_seconds: float = 10.0,
        tempfail_retry_seconds: float = 5.0,
        check_ownership: bool = False,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self._clock = clock
        self._stop = stop
        self._log = log
        self._grace = kill_grace_seconds
        self._tempfail_retry = tempfail_retry_seconds
        self._check_ownership = check_ownership
        self._environment = dict(hook_environment() if environment is None else environment)

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
            outcome, status = self._run_checked(
                _Run(hook, context, deadline, log, tail, on_start), attempts
            )
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
        facts = {
            "outcome": outcome,
            "exit_status": status,
            "attempts": attempts,
            "duration_seconds": round(duration, 3),
        }
        if outcome == SUCCEEDED:
            log.info("hook.finished", **facts)
        elif outcome == INTERRUPTED:
            # The agent is stopping (a planned stop): no failure; the hook runs again at the
            # next start.
            log.info("hook.interrupted", **facts, consequence="runs again when the agent starts")
        else:
            log.error("hook.failed", **facts)
        return result

    def _run_checked(self, run: _Run, attempt: int) -> tuple[str, int | None]:
        """Check the hook as it is now and run what was checked, once."""
        if run.deadline() - self._clock.monotonic() <= 0:
            return TIMED_OUT, None
        fd, refusal = open_hook(run.hook.path, check_ownership=self._check_ownership)
        if fd is None:
            run.log.error("hook.refused", reason=refusal)
            run.tail.clear()
            run.tail.append(f"{refusal}\n")
            return REFUSED, None
        try:
            run.log.info("hook.started", attempt=attempt, deadline=iso_utc(run.context.deadline))
            started = self._start(fd, run)
        finally:
            os.close(fd)
        if started is None:
            return FAILED, None
        return self._follow(started, run)

    def _start(self, hook_fd: int, run: _Run) -> _Started | None:
        """Start the shepherd that executes ``hook_fd``; None (logged) when it cannot start."""
        hook = run.hook
        environment = {
            **self._environment,
            **run.context.environment(),
            "SCHEDULED_EVENT_HOOK_PATH": _environment_safe(str(hook.path)),
        }
        stdin_read, stdin_write = os.pipe2(os.O_CLOEXEC)
        output_read, output_write = os.pipe2(os.O_CLOEXEC)
        status_read, status_write = os.pipe2(os.O_CLOEXEC)
        argv = [
            sys.executable,
            "-I",
            "-S",
            SHEPHERD,
            str(hook_fd),
            str(status_write),
            repr(self._grace),
            str(hook.path),
        ]
        try:
            process = subprocess.Popen(
                argv,
                stdin=stdin_read,
                stdout=output_write,
                stderr=output_write,
                env=environment,
                cwd="/",
                start_new_session=True,  # its own process group, so we can stop all of it
                close_fds=True,
                pass_fds=(hook_fd, status_write),
            )
        except OSError as error:
            for fd in (stdin_write, output_read, status_read):
                os.close(fd)
            _start_failed(run, error.strerror or str(error))
            return None
        finally:
            for fd in (stdin_read, output_write, status_write):
                os.close(fd)
        if run.on_start is not None:
            run.on_start(process.pid)
        return _Started(process, stdin_write, output_read, status_read)

    def _follow(self, started: _Started, run: _Run) -> tuple[str, int | None]:
        """Feed, read and wait for a started run, stopping it at its deadline or on shutdown."""
        process, log = started.process, run.log
        exited = threading.Event()
        ended = threading.Event()  # the run is over: the stdin and output threads finish
        feeder = threading.Thread(
            target=_feed, args=(started.stdin, run.context.stdin_json(), ended), daemon=True
        )
        reader = threading.Thread(
            target=_pump, args=(started.output, log, run.tail, ended), daemon=True
        )
        reaper = threading.Thread(target=_reap, args=(process, exited), daemon=True)
        for thread in (feeder, reader, reaper):
            thread.start()
        outcome: str | None = None
        while not exited.wait(min(max(run.deadline() - self._clock.monotonic(), 0.0), 0.25)):
            if self._clock.monotonic() >= run.deadline():
                outcome = TIMED_OUT
            elif self._stop.is_set():
                outcome = INTERRUPTED
            else:
                continue
            log.warning("hook.stopping", reason=outcome, pid=process.pid)
            self._stop_run(process.pid, exited)
            break
        ended.set()
        feeder.join()
        reader.join()
        report = _shepherd_report(started.status)
        if report.get("killed"):
            log.warning(
                "hook.descendants_killed",
                count=report["killed"],
                reason="processes the hook started were still running when it ended",
            )
        if "error" in report:
            _start_failed(run, str(report["error"]))
            return FAILED, None
        wait_status = report.get("wait_status")
        status = (
            os.waitstatus_to_exitcode(wait_status)
            if isinstance(wait_status, int)
            else process.returncode
        )
        if outcome is not None:
            return outcome, status
        if status == 0:
            return SUCCEEDED, status
        if status == EX_TEMPFAIL:
            return "tempfail", status
        return FAILED, status

    def _stop_run(self, pid: int, exited: threading.Event) -> None:
        """SIGTERM to the shepherd, which passes it on to all the hook started and kills what
        is left after the grace period; the whole process group is killed if it does not."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)  # a hook may have stopped its shepherd
        if not exited.wait(self._grace + SHEPHERD_MARGIN_SECONDS):
            _kill_group(pid, signal.SIGKILL)
            exited.wait()


def _start_failed(run: _Run, why: str) -> None:
    message = f"hook '{run.hook.name}' cannot be started: {why} ({run.hook.path})"
    run.log.error("hook.start_failed", reason=message)
    run.tail.clear()
    run.tail.append(message + "\n")


def _shepherd_report(fd: int) -> dict[str, Any]:
    """What the shepherd wrote before it exited (nothing when it was killed); closes ``fd``."""
    try:
        os.set_blocking(fd, False)
        with contextlib.suppress(BlockingIOError):
            data = os.read(fd, 65536)
            report: dict[str, Any] = {}
            for line in data.splitlines():
                with contextlib.suppress(ValueError):
                    item = json.loads(line)
                    if isinstance(item, dict):
                        report.update(item)
            return report
        return {}
    finally:
        os.close(fd)


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
    if leader is not None:
        # The shepherd passes SIGTERM on to all the hook started, in any session.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    else:
        _kill_group(pid, signal.SIGTERM)
    deadline = clock.monotonic() + grace_seconds + SHEPHERD_MARGIN_SECONDS
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


def _feed(fd: int, data: bytes, ended: threading.Event) -> None:
    """Write ``data`` to the hook's stdin and close it; stops when the run ends. A hook may
    close its stdin without reading it: its choice, not an error."""
    try:
        os.set_blocking(fd, False)
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        view = memoryview(data)
        while view and not ended.is_set():
            if not poller.poll(100):
                continue
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                continue
            except OSError:
                break
    finally:
        os.close(fd)


def _reap(process: subprocess.Popen[bytes], exited: threading.Event) -> None:
    process.wait()
    exited.set()


# Once the run has ended, the output still buffered is read up to this many times.
DRAIN_READS = 64


def _pump(fd: int, log: Any, tail: deque[str], ended: threading.Event) -> None:
    """Log each output line (up to a bound) and keep the last TAIL_BYTES of output.

    Reads until the end of the output, or until the run has ended and what it left in the pipe
    is read; then closes ``fd`` itself, so the number is never read again after reuse."""
    logged = dropped = drains = 0
    tail_size = sum(len(line) for line in tail)

    def emit(raw: bytes) -> None:
        nonlocal logged, dropped, tail_size
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

    pending = b""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        while True:
            finished = ended.is_set()
            if not poller.poll(0 if finished else 100):
                if finished:
                    break
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > MAX_LINE_CHARS:
                lines.append(pending)
                pending = b""
            for raw in lines:
                emit(raw)
            if finished:
                drains += 1
                if drains >= DRAIN_READS:
                    break
    finally:
        os.close(fd)
    if pending:
        emit(pending)
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
