"""The shepherd of one hook run: the hook's parent, and the subreaper of all it starts.

The agent starts this file as ``python -I -S shepherd.py HOOK_FD STATUS_FD GRACE NAME`` in a new
session, with the hook's clean environment, its stdin and its output. It stands alone (standard
library only) because it must start fast and must not import the agent.

- It marks itself a child subreaper (``PR_SET_CHILD_SUBREAPER``): whatever the hook forks off,
  even into a new session with ``setsid``, becomes its child when its parent dies, so it can be
  found and killed. ``killpg`` alone cannot reach a new session.
- It runs the hook from the descriptor HOOK_FD (``fexecve``): the very file the agent opened and
  checked, whatever has been renamed or replaced on disk since. A script sees ``$0`` as
  ``/dev/fd/HOOK_FD``, which stays open for its interpreter.
- When the hook exits, every descendant still alive is killed (SIGKILL) and reaped: its
  children one by one, then theirs as they become its own, until it has none.
- SIGTERM (the agent stopping the run) goes on to every descendant; those left after GRACE
  seconds are killed.
- Last, it writes one JSON line to STATUS_FD: ``{"wait_status": W, "killed": K}``, or
  ``{"error": "..."}`` when the hook could not be started.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False  # typing itself takes 7 ms to import
if TYPE_CHECKING:
    import signal
else:  # the C module under the signal package, without its enums (5 ms more)
    import _signal as signal

# Only what must come before the hook starts is imported here: each module is time on the way to
# the hook (json, contextlib, typing, ctypes and signal's enums would add about 20 ms).

PR_SET_CHILD_SUBREAPER = 36
KILL_BOUND_SECONDS = 10.0


def children_by_parent() -> dict[int, list[int]]:
    """Live (not zombie) processes by parent PID, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it ended meanwhile
        if len(fields) > 1 and fields[0] not in ("Z", "X"):
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def descendants(root: int) -> list[int]:
    tree = children_by_parent()
    found: list[int] = []
    pending = list(tree.get(root, ()))
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(tree.get(pid, ()))
    return found


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as file:
            return int(file.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def signal_descendants(signal_number: int) -> set[int]:
    """Send ``signal_number`` to every live descendant; the PIDs it reached.

    Each is held by a pidfd and checked again to still descend from us before the signal, so a
    PID reused by a stranger in between is never signalled."""
    me = os.getpid()
    found = descendants(me)
    family = {me, *found}
    reached: set[int] = set()
    for pid in found:
        try:
            handle = os.pidfd_open(pid)
        except OSError:
            continue  # gone already
        try:
            if parent_of(pid) in family:
                signal.pidfd_send_signal(handle, signal_number)
                reached.add(pid)
        except OSError:
            pass
        finally:
            os.close(handle)
    return reached


def reap_all() -> bool:
    """Reap every child that has ended; False once there are no children at all."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def children() -> list[int]:
    """Our own children, ended or not. A child's PID stays ours until we reap it, so signalling
    one is never a stranger's. Read from /proc/self/task/*/children, which lists them even when
    /proc hides other users' processes (systemd's ProtectProc=invisible) and a hook switched to
    another user; from each process's parent in /proc when the kernel lacks that file."""
    found: list[int] = []
    try:
        for task in os.scandir("/proc/self/task"):
            with open(f"{task.path}/children", encoding="ascii") as file:
                found.extend(int(pid) for pid in file.read().split())
    except OSError:
        return children_by_parent().get(os.getpid(), [])
    return found


def is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as file:
            return file.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False  # hidden from us: count it as alive


def kill_everything_left() -> int:
    """SIGKILL our children until none is left: as each dies, its own children become ours
    (we are their subreaper), so the whole tree goes, whoever it runs as. How many were
    killed (those not dead already)."""
    killed: set[int] = set()
    ends = time.monotonic() + KILL_BOUND_SECONDS
    while reap_all() and time.monotonic() < ends:
        for pid in children():
            if pid in killed or is_zombie(pid):
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    return len(killed)


def signal_all(signal_number: int) -> None:
    """``signal_number`` to every descendant /proc shows us and to each of our children."""
    signal_descendants(signal_number)
    for pid in children():
        try:
            os.kill(pid, signal_number)
        except ProcessLookupError:
            pass


def report(status_fd: int, message: dict[str, object]) -> None:
    import json  # needed only once the hook has run, or failed to start

    try:
        os.write(status_fd, (json.dumps(message) + "\n").encode("ascii"))
    except OSError:
        pass  # the agent is gone: nobody to tell


def start_hook(hook_fd: int, name: str, status_fd: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    # Python ignores SIGPIPE and SIGXFSZ, and the handlers above are the shepherd's own: a hook
    # starts with every signal Python can set at its default.
    for number in signal.valid_signals():
        if number in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(number) != signal.SIG_DFL:
                signal.signal(number, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    try:
        os.execve(hook_fd, [name], dict(os.environ))  # noqa: S606 (argv, never a shell)
    except OSError as error:
        report(status_fd, {"error": f"{error.strerror}"})
    os._exit(127)


def become_subreaper() -> int:
    """``prctl(PR_SET_CHILD_SUBREAPER, 1)``; 0, or the errno. Through ``_ctypes`` itself: the
    ``ctypes`` package takes 5 ms to import, on the way to every hook; it is the fallback for
    a Python whose ``_ctypes`` does not offer these names."""
    try:
        import _ctypes

        class Int(_ctypes._SimpleCData[int]):
            _type_ = "i"

        class Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = Int

        handle = _ctypes.dlopen(None, 0)  # type: ignore[arg-type]  # None: the program itself
        prctl = Function(_ctypes.dlsym(handle, "prctl"))
    except (ImportError, AttributeError, TypeError, OSError):
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return ctypes.get_errno() or 1
        return 0
    if prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        return int(_ctypes.get_errno()) or 1
    return 0


def main(argv: list[str]) -> int:
    hook_fd, status_fd = int(argv[1]), int(argv[2])
    grace, name = float(argv[3]), argv[4]
    os.set_inheritable(status_fd, False)
    os.set_inheritable(hook_fd, True)
    error = become_subreaper()
    if error:
        report(status_fd, {"error": f"cannot become a subreaper: {os.strerror(error)}"})
        return 1

    def stop(_signal: int, _frame: object) -> None:
        signal_all(signal.SIGTERM)
        signal.setitimer(signal.ITIMER_REAL, grace)

    def kill(_signal: int, _frame: object) -> None:
        signal_all(signal.SIGKILL)

    signal.signal(signal.SIGALRM, kill)
    signal.signal(signal.SIGTERM, stop)
    hook = start_hook(hook_fd, name, status_fd)
    os.close(hook_fd)
    # The hook holds its stdin and output; the shepherd lets go of them, so that the agent sees
    # the end of the output when the hook and what it started are gone.
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    while True:
        try:
            _, wait_status = os.waitpid(hook, 0)
            break
        except ChildProcessError:
            wait_status = 127 << 8
            break
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    killed = kill_everything_left()
    signal.setitimer(signal.ITIMER_REAL, 0)
    report(status_fd, {"wait_status": wait_status, "killed": killed})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
