"""The example hooks in hooks/: they pass shellcheck, do nothing when their settings are unset,
and the ones that need no outside system do their job.

The hooks run here as the agent runs them: as a process of their own with a clean environment
(their settings come from the hooks.env file that HOOKS_ENV names), the event in
SCHEDULED_EVENT_* variables and as JSON on stdin, executed through a descriptor (so $0 is
/dev/fd/N and SCHEDULED_EVENT_HOOK_PATH names the file). Outside programs (kubectl, systemctl)
are stand-ins first on PATH that record how they were called.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

HOOKS = Path(__file__).resolve().parent.parent / "hooks"
PREPARE = sorted(HOOKS.glob("prepare.d/*"))
RECOVER = sorted(HOOKS.glob("recover.d/*"))
SCRIPTS = sorted([*PREPARE, *RECOVER, HOOKS / "lib" / "common.sh"])
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class HookRun:
    status: int
    output: str
    seconds: float


class HookHost:
    """Runs example hooks the way the agent does, with settings written to a hooks.env file."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.settings: dict[str, str] = {}
        self.bin = tmp_path / "bin"
        self.bin.mkdir(exist_ok=True)
        self.home = tmp_path / "home"
        self.home.mkdir(exist_ok=True)
        self.env_file = tmp_path / "hooks.env"
        self.path = f"{self.bin}:{SYSTEM_PATH}"

    def stand_in(self, name: str, body: str) -> Path:
        """A program called ``name``, first on the hooks' PATH."""
        path = self.bin / name
        path.write_text(body)
        path.chmod(0o755)
        return path

    def environment(
        self, hook: Path, event_id: str, description: str, deadline_in: float
    ) -> dict[str, str]:
        phase = "prepare" if hook.parent.name == "prepare.d" else "recover"
        deadline = datetime.now(timezone.utc) + timedelta(seconds=deadline_in)
        return {
            "PATH": self.path,
            "LANG": "C.UTF-8",
            "TZ": "UTC",
            "HOME": str(self.home),
            "HOOKS_ENV": str(self.env_file),
            "SCHEDULED_EVENT_ID": event_id,
            "SCHEDULED_EVENT_TYPE": "Reboot",
            "SCHEDULED_EVENT_STATUS": "Scheduled",
            "SCHEDULED_EVENT_SOURCE": "Platform",
            "SCHEDULED_EVENT_NOT_BEFORE": "",
            "SCHEDULED_EVENT_DURATION_SECONDS": "-1",
            "SCHEDULED_EVENT_RESOURCES": "web_4",
            "SCHEDULED_EVENT_DESCRIPTION": description,
            "SCHEDULED_EVENT_PHASE": phase,
            "SCHEDULED_EVENT_VM_NAME": "web_4",
            "SCHEDULED_EVENT_DEADLINE": deadline.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "SCHEDULED_EVENT_HOOK_PATH": str(hook),
        }

    def run(
        self,
        name: str,
        *,
        event_id: str = "A1B2",
        description: str = "Host server is undergoing maintenance.",
        deadline_in: float = 60.0,
        through_descriptor: bool = True,
    ) -> HookRun:
        hook = HOOKS / name
        self.env_file.write_text(
            "".join(f"{key}={shlex.quote(value)}\n" for key, value in self.settings.items())
        )
        env = self.environment(hook, event_id, description, deadline_in)
        stdin = json.dumps(
            {
                "phase": env["SCHEDULED_EVENT_PHASE"],
                "vm_name": "web_4",
                "document_incarnation": 3,
                "event": {"EventId": event_id, "EventType": "Reboot", "Description": description},
            }
        )
        if not through_descriptor:
            del env["SCHEDULED_EVENT_HOOK_PATH"]
        fd = os.open(hook, os.O_RDONLY)
        try:
            argv = [f"/dev/fd/{fd}"] if through_descriptor else [str(hook)]
            started = time.monotonic()
            completed = subprocess.run(
                argv,
                input=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                cwd="/",
                pass_fds=(fd,),
                timeout=deadline_in + 30,
                check=False,
            )
            seconds = time.monotonic() - started
        finally:
            os.close(fd)
        return HookRun(completed.returncode, completed.stdout, seconds)


@pytest.fixture
def hooks(tmp_path: Path) -> HookHost:
    return HookHost(tmp_path)


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
    assert len(PREPARE) == len(RECOVER) == 5
    for path in [*PREPARE, *RECOVER]:
        assert path.stat().st_mode & 0o111, path


def test_every_example_finds_its_library_through_the_hook_path_not_its_descriptor() -> None:
    for path in [*PREPARE, *RECOVER]:
        text = path.read_text()
        assert '. "$(dirname "${SCHEDULED_EVENT_HOOK_PATH:-$0}")/../lib/common.sh"' in text, path
        assert '$(dirname "$0")' not in text, path


# What the examples would touch with the old defaults, or their defaults now.
DEFAULT_PATHS = [
    Path("/run/scheduled-events-agent/drain"),
    Path("/var/lib/scheduled-events-agent/hooks"),
]
RECORDED_PROGRAMS = ["kubectl", "socat", "systemctl", "curl", "jq"]


@pytest.mark.parametrize("hook", [*PREPARE, *RECOVER], ids=lambda path: path.name)
def test_every_example_does_nothing_without_settings(hooks: HookHost, hook: Path) -> None:
    calls = hooks.tmp / "calls"
    for program in RECORDED_PROGRAMS:
        hooks.stand_in(program, f'#!/bin/sh\necho "{program} $*" >>{calls}\nexit 0\n')
    existed = {path: path.exists() for path in DEFAULT_PATHS}
    hooks.env_file.touch()
    before = sorted(hooks.tmp.rglob("*"))

    result = hooks.run(f"{hook.parent.name}/{hook.name}")

    assert result.status == 0, result.output
    assert "unset" in result.output
    assert not calls.exists(), calls.read_text()
    assert sorted(hooks.tmp.rglob("*")) == before
    assert {path: path.exists() for path in DEFAULT_PATHS} == existed


def test_the_probe_flag_is_set_then_removed(hooks: HookHost) -> None:
    flag = hooks.tmp / "run" / "drain"
    hooks.settings = {"DRAIN_FLAG": str(flag), "LB_PROBE_WAIT_SECONDS": "0"}
    first = hooks.run("prepare.d/20-lb-probe-down")
    assert first.status == 0, first.output
    assert flag.exists()
    assert "waiting 0s" in first.output
    # Idempotent: a second run (after a crash, say) succeeds too.
    assert hooks.run("prepare.d/20-lb-probe-down").status == 0
    assert hooks.run("recover.d/80-lb-probe-up").status == 0
    assert not flag.exists()
    assert hooks.run("recover.d/80-lb-probe-up").status == 0


def test_the_probe_wait_is_cut_short_by_the_deadline(hooks: HookHost) -> None:
    hooks.settings = {"DRAIN_FLAG": str(hooks.tmp / "drain"), "LB_PROBE_WAIT_SECONDS": "3600"}
    # The deadline less the hook's 2 s of margin leaves 1 s (seconds_left never says less).
    result = hooks.run("prepare.d/20-lb-probe-down", deadline_in=3)
    assert result.status == 0, result.output
    assert "waiting 1s" in result.output
    assert result.seconds < 30


def test_a_probe_wait_that_is_no_number_fails_before_setting_the_flag(hooks: HookHost) -> None:
    flag = hooks.tmp / "drain"
    hooks.settings = {"DRAIN_FLAG": str(flag), "LB_PROBE_WAIT_SECONDS": "15s"}
    result = hooks.run("prepare.d/20-lb-probe-down")
    assert result.status == 1
    assert "LB_PROBE_WAIT_SECONDS=15s" in result.output
    assert not flag.exists()


def test_services_are_stopped_then_started_in_the_order_given(hooks: HookHost) -> None:
    calls = hooks.tmp / "calls"
    hooks.stand_in("systemctl", f'#!/bin/sh\necho "$*" >>{calls}\n')
    hooks.settings = {"STOP_SERVICES": "app.service worker.service"}
    assert hooks.run("prepare.d/40-stop-service").status == 0
    assert hooks.run("recover.d/60-start-service").status == 0
    assert calls.read_text().splitlines() == [
        "stop app.service",
        "stop worker.service",
        "start app.service",
        "start worker.service",
    ]


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
    hooks: HookHost, webhook: str
) -> None:
    hooks.settings = {"WEBHOOK_URL": webhook}
    marker = hooks.tmp / "pwned"
    hostile = f'"}}, "x": "$(touch {marker})`touch {marker}`\nnext line'
    assert hooks.run("prepare.d/00-notify", description=hostile).status == 0
    assert hooks.run("recover.d/99-notify").status == 0
    first, second = Webhook.received
    assert set(first) == {"text"}
    assert "A1B2" in first["text"] and hostile in first["text"]
    assert "over" in second["text"]
    assert not marker.exists()


FAILING_SYSTEMCTL = '#!/bin/sh\necho "Unit $2 not loaded." >&2\nexit 5\n'
FAILING_KUBECTL = '#!/bin/sh\necho "error: the server is unreachable" >&2\nexit 1\n'


@dataclass
class Failing:
    name: str
    settings: dict[str, str]
    stand_ins: dict[str, str]
    status: int


FAILING = [
    Failing(
        "prepare.d/40-stop-service", {"STOP_SERVICES": "x"}, {"systemctl": FAILING_SYSTEMCTL}, 5
    ),
    Failing(
        "recover.d/60-start-service", {"STOP_SERVICES": "x"}, {"systemctl": FAILING_SYSTEMCTL}, 5
    ),
    Failing("prepare.d/50-k8s-drain", {"K8S_NODE_NAME": "n"}, {"kubectl": FAILING_KUBECTL}, 1),
    Failing("prepare.d/30-haproxy-drain", {"HAPROXY_BACKEND": "app"}, {}, 1),
    Failing("recover.d/70-haproxy-ready", {"HAPROXY_BACKEND": "app"}, {}, 1),
    Failing("prepare.d/20-lb-probe-down", {"LB_PROBE_WAIT_SECONDS": "x"}, {}, 1),
]


@pytest.mark.parametrize("case", FAILING, ids=lambda case: Path(case.name).name)
@pytest.mark.parametrize("through_descriptor", [True, False], ids=["fd", "path"])
def test_a_failing_hook_posts_a_failure_notice_naming_itself(
    hooks: HookHost, webhook: str, case: Failing, through_descriptor: bool
) -> None:
    name, settings, stand_ins, status = case.name, case.settings, case.stand_ins, case.status
    hooks.settings = {
        "WEBHOOK_URL": webhook,
        "HAPROXY_SERVER": "web1",
        # No HAProxy listens there: the real socat fails to connect.
        "HAPROXY_SOCKET": str(hooks.tmp / "no-haproxy.sock"),
        "DRAIN_FLAG": str(hooks.tmp / "drain"),
        "HOOKS_STATE_DIR": str(hooks.tmp / "state"),
        **settings,
    }
    if "HAPROXY_BACKEND" in settings:
        assert shutil.which("socat"), "socat is needed (.ci/run installs it)"
    # Stand-ins first on PATH: the test must not touch the machine's services or a cluster.
    for program, body in stand_ins.items():
        hooks.stand_in(program, body)
    result = hooks.run(name, through_descriptor=through_descriptor)
    assert result.status == status, result.output
    (notice,) = Webhook.received
    assert f"{Path(name).name} failed with status {status}" in notice["text"]


# Kubernetes: a kubectl stand-in that keeps the node's unschedulable flag in a file.
KUBECTL = """#!{python}
import json, sys
from pathlib import Path
state = Path({state!r})
with open({log!r}, "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
name = args[2] if args[0] == "get" else args[1]
if name != {node!r}:
    sys.exit(f'Error from server (NotFound): nodes "{{name}}" not found')
if args[0] == "get":
    assert args[3:] == ["-o", "jsonpath={{.spec.unschedulable}}"], args
    print("true" if state.read_text() == "true" else "", end="")
elif args[0] == "cordon":
    state.write_text("true")
    print(f"node/{{args[1]}} cordoned")
elif args[0] == "uncordon":
    state.write_text("false")
    print(f"node/{{args[1]}} uncordoned")
elif args[0] == "drain":
    if Path({drain_fails!r}).exists():
        sys.exit("error: cannot delete Pods with local storage (use --delete-emptydir-data)")
    print(f"node/{{args[1]}} drained")
else:
    sys.exit(f"unexpected kubectl call {{args}}")
"""


class Cluster:
    """One node as the kubectl stand-in sees it, and every call made to it."""

    node = "aks-pool-1"

    def __init__(self, hooks: HookHost) -> None:
        self.state = hooks.tmp / "unschedulable"
        self.log = hooks.tmp / "kubectl.log"
        self.drain_fails = hooks.tmp / "drain-fails"
        self.state_dir = hooks.tmp / "var-lib-hooks"
        self.set_cordoned(False)
        hooks.stand_in(
            "kubectl",
            KUBECTL.format(
                python=sys.executable,
                state=str(self.state),
                log=str(self.log),
                node=self.node,
                drain_fails=str(self.drain_fails),
            ),
        )
        hooks.settings = {"K8S_NODE_NAME": self.node, "HOOKS_STATE_DIR": str(self.state_dir)}

    def cordoned(self) -> bool:
        return self.state.read_text() == "true"

    def set_cordoned(self, value: bool) -> None:
        self.state.write_text("true" if value else "false")

    def calls(self) -> list[list[str]]:
        """The calls since the last look."""
        if not self.log.exists():
            return []
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        self.log.unlink()
        return calls

    def record(self, event_id: str) -> Path:
        return self.state_dir / f"k8s-cordon-{hashlib.sha256(event_id.encode()).hexdigest()}"


@pytest.fixture
def cluster(hooks: HookHost) -> Cluster:
    return Cluster(hooks)


def drain_timeout(call: list[str]) -> int:
    (flag,) = [arg for arg in call if arg.startswith("--timeout=")]
    assert flag.endswith("s"), flag
    return int(flag[len("--timeout=") : -1])


@pytest.mark.parametrize("delete_emptydir", ["", "no", "yes"])
def test_a_schedulable_node_is_cordoned_drained_then_uncordoned(
    hooks: HookHost, cluster: Cluster, delete_emptydir: str
) -> None:
    if delete_emptydir:
        hooks.settings["K8S_DELETE_EMPTYDIR_DATA"] = delete_emptydir
    result = hooks.run("prepare.d/50-k8s-drain", deadline_in=60)
    assert result.status == 0, result.output

    get, cordon, drain = cluster.calls()
    node = cluster.node
    assert get == ["get", "node", node, "-o", "jsonpath={.spec.unschedulable}"]
    assert cordon == ["cordon", node]
    emptydir = ["--delete-emptydir-data"] if delete_emptydir == "yes" else []
    assert drain[:-1] == ["drain", node, "--ignore-daemonsets", *emptydir]
    # The deadline a minute ahead, less the 2 s the hook keeps for itself.
    assert 45 <= drain_timeout(drain) <= 58
    assert cluster.cordoned()
    # The record is on disk before the reboot, under the event's hash, and says what was found.
    record = cluster.record("A1B2")
    assert record.read_text() == f"node={node}\nunschedulable_before=false\n"
    assert oct(cluster.state_dir.stat().st_mode & 0o777) == "0o700"

    result = hooks.run("recover.d/90-k8s-uncordon")
    assert result.status == 0, result.output
    assert cluster.calls() == [["uncordon", node]]
    assert not cluster.cordoned()
    assert not record.exists()
    # Run again (the agent died before it learnt the first run ended): the node is left alone.
    again = hooks.run("recover.d/90-k8s-uncordon")
    assert again.status == 0
    assert "no cordon record" in again.output
    assert cluster.calls() == []


def test_a_node_cordoned_before_the_event_stays_cordoned(hooks: HookHost, cluster: Cluster) -> None:
    cluster.set_cordoned(True)
    result = hooks.run("prepare.d/50-k8s-drain")
    assert result.status == 0, result.output
    assert "already unschedulable" in result.output
    assert "unschedulable_before=true" in cluster.record("A1B2").read_text()
    assert [call[0] for call in cluster.calls()] == ["get", "cordon", "drain"]

    result = hooks.run("recover.d/90-k8s-uncordon")
    assert result.status == 0, result.output
    assert "leaving it cordoned" in result.output
    assert cluster.calls() == []
    assert cluster.cordoned()
    assert not cluster.record("A1B2").exists()


def test_a_prepare_run_again_keeps_the_first_record(hooks: HookHost, cluster: Cluster) -> None:
    assert hooks.run("prepare.d/50-k8s-drain").status == 0
    cluster.calls()
    # The agent died during the first run: it runs the hook again, with the node cordoned by it.
    again = hooks.run("prepare.d/50-k8s-drain")
    assert again.status == 0, again.output
    assert "keeping this event's record" in again.output
    assert [call[0] for call in cluster.calls()] == ["cordon", "drain"]
    assert "unschedulable_before=false" in cluster.record("A1B2").read_text()

    assert hooks.run("recover.d/90-k8s-uncordon").status == 0
    assert cluster.calls() == [["uncordon", cluster.node]]
    assert not cluster.cordoned()


@pytest.mark.parametrize("cordoned_by_hand", [False, True], ids=["schedulable", "by-hand"])
@pytest.mark.parametrize("first_recover", ["first", "second"])
def test_overlapping_events_leave_the_node_as_it_was_before_the_first(
    hooks: HookHost, cluster: Cluster, cordoned_by_hand: bool, first_recover: str
) -> None:
    cluster.set_cordoned(cordoned_by_hand)
    assert hooks.run("prepare.d/50-k8s-drain", event_id="first").status == 0
    # The second event's prepare finds the node cordoned by the first one's.
    second = hooks.run("prepare.d/50-k8s-drain", event_id="second")
    assert second.status == 0, second.output
    assert "unschedulable_before=true" in cluster.record("second").read_text()
    cluster.calls()

    # Both recovers run once both events are over, in either order.
    order = ["first", "second"] if first_recover == "first" else ["second", "first"]
    for event_id in order:
        result = hooks.run("recover.d/90-k8s-uncordon", event_id=event_id)
        assert result.status == 0, result.output
        assert not cluster.record(event_id).exists()
    uncordons = [call for call in cluster.calls() if call[0] == "uncordon"]
    assert uncordons == ([] if cordoned_by_hand else [["uncordon", cluster.node]])
    assert cluster.cordoned() == cordoned_by_hand


def test_a_recover_with_no_record_leaves_the_node_as_it_is(
    hooks: HookHost, cluster: Cluster
) -> None:
    cluster.set_cordoned(True)
    result = hooks.run("recover.d/90-k8s-uncordon")
    assert result.status == 0, result.output
    assert (
        "no cordon record" in result.output and "leaving node aks-pool-1 as it is" in result.output
    )
    assert cluster.calls() == []
    assert cluster.cordoned()


def test_a_drain_blocked_by_emptydir_pods_fails_and_says_how_to_allow_it(
    hooks: HookHost, cluster: Cluster
) -> None:
    cluster.drain_fails.touch()
    result = hooks.run("prepare.d/50-k8s-drain")
    assert result.status == 1
    assert "K8S_DELETE_EMPTYDIR_DATA=yes deletes their data" in result.output


def test_an_unknown_emptydir_choice_fails_before_touching_the_node(
    hooks: HookHost, cluster: Cluster
) -> None:
    hooks.settings["K8S_DELETE_EMPTYDIR_DATA"] = "true"
    result = hooks.run("prepare.d/50-k8s-drain")
    assert result.status == 1
    assert "expected yes or no" in result.output
    assert cluster.calls() == []


@pytest.mark.parametrize("name", ["prepare.d/50-k8s-drain", "recover.d/90-k8s-uncordon"])
def test_a_node_name_without_kubectl_fails(hooks: HookHost, name: str) -> None:
    # A PATH holding the few tools the hooks use before they look for kubectl, and no kubectl
    # (this machine may well have one).
    tools = hooks.tmp / "tools"
    tools.mkdir()
    for tool in ("dirname", "basename", "date", "cut", "sha256sum"):
        found = shutil.which(tool, path=SYSTEM_PATH)
        assert found, tool
        (tools / tool).symlink_to(found)
    hooks.path = str(tools)
    hooks.settings = {"K8S_NODE_NAME": "n", "HOOKS_STATE_DIR": str(hooks.tmp / "state")}
    result = hooks.run(name)
    assert result.status == 1
    assert "kubectl is not on PATH" in result.output
