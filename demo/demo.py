"""make demo: the whole lifecycle of a Reboot event in a few seconds, off Azure.

Starts the emulator with the reboot scenario at 60 times speed (15 minutes of notice become 15
seconds), runs the agent against it with two of the example hooks copied into a temporary
directory, shows the agent's log as it goes, and stops once the recover hooks ran. Talks only to
127.0.0.1. Exits 0 when the lifecycle completed within a minute, 1 otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ("prepare.d/20-lb-probe-down", "recover.d/80-lb-probe-up")
MILESTONES = (
    "event.discovered",
    "hook.finished",
    "event.approved",
    "event.started",
    "event.gone",
    "event.recovered",
)
LIMIT_SECONDS = 60


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="scheduled-events-demo-"))
    workdir.chmod(0o755)
    for example in EXAMPLES:
        target = workdir / example
        target.parent.mkdir(mode=0o755, exist_ok=True)
        shutil.copy2(ROOT / "hooks" / example, target)
    shutil.copytree(ROOT / "hooks" / "lib", workdir / "lib")
    (workdir / "hooks.env").write_text(f"DRAIN_FLAG={workdir}/drain\nLB_PROBE_WAIT_SECONDS=2\n")
    python = sys.executable
    emulator = subprocess.Popen(
        [
            python,
            "-m",
            "agent",
            "emulator",
            "--port",
            "0",
            "--scenario",
            "reboot",
            "--time-scale",
            "60",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert emulator.stdout is not None
    banner = emulator.stdout.readline()
    print(banner, end="")
    match = re.search(r"(http://127\.0\.0\.1:\d+)", banner)
    if not match:
        emulator.kill()
        print("demo: the emulator did not start", file=sys.stderr)
        return 1
    config = workdir / "config.yaml"
    config.write_text(
        f"imds: {{url: '{match.group(1)}'}}\n"
        f"hooks: {{prepare_dir: '{workdir}/prepare.d', recover_dir: '{workdir}/recover.d',"
        " timeout_seconds: 30}\n"
        f"state: {{path: '{workdir}/state.db'}}\n"
        "metrics: {listen: null}\n"
        f"arm: {{url: '{match.group(1)}'}}\n"
        "logging: {format: console}\n"
    )
    environment_hooks = {"HOOKS_ENV": str(workdir / "hooks.env")}
    agent = subprocess.Popen(
        [python, "-m", "agent", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **environment_hooks},
    )
    seen: list[str] = []
    done = threading.Event()

    def follow() -> None:
        assert agent.stdout is not None
        for line in agent.stdout:
            print(line, end="", flush=True)
            seen.extend(name for name in MILESTONES if name in line)
            if "event.recovered" in line:
                done.set()

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    started = time.monotonic()
    finished = done.wait(LIMIT_SECONDS)
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=30)
    reader.join(timeout=5)
    emulator.send_signal(signal.SIGTERM)
    emulator.wait(timeout=30)
    elapsed = time.monotonic() - started
    missing = [name for name in MILESTONES if name not in seen]
    print()
    subprocess.run([python, "-m", "agent", "history", "--config", str(config)], check=False)
    shutil.rmtree(workdir, ignore_errors=True)
    if not finished or missing:
        print(f"demo: FAILED after {elapsed:.1f} s; never saw {', '.join(missing)}")
        return 1
    print(f"\ndemo: the whole lifecycle took {elapsed:.1f} s: {' -> '.join(MILESTONES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
