"""The balancer example hooks against the real thing: Debian's HAProxy and nginx, run by the test
on 127.0.0.1, with the hooks run as the agent runs them (see tests/test_example_hooks.py).

HAProxy: a TCP frontend in front of one server, an echo server in a thread of the test; the
drain hook must hold (exit 75) while a client's session through HAProxy is open, and the
runtime API must show the server in drain, then ready again after the recover hook. nginx: the
health location shipped in the probe hook's comment answers 503 while the drain flag is set.
.ci/run installs haproxy, nginx and socat; none of these tests is skipped without them.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.test_example_hooks import HOOKS, HookHost

SEARCH_PATH = f"{os.environ.get('PATH', '')}:/usr/local/sbin:/usr/sbin:/sbin"


def program(name: str) -> str:
    found = shutil.which(name, path=SEARCH_PATH)
    if not found:
        pytest.fail(f"{name} is needed for these tests (.ci/run installs it)")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class EchoBackend:
    """The server behind HAProxy: echoes what it gets and tells when a connection arrived."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                owner.connected.set()
                while data := self.request.recv(4096):
                    self.request.sendall(data)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class RealHAProxy:
    backend = "app"
    server = "web1"

    def __init__(self, tmp: Path, backend_port: int) -> None:
        self.socket = tmp / "admin.sock"
        self.api_port = free_port()
        self.port = free_port()
        config = tmp / "haproxy.cfg"
        config.write_text(
            f"""global
  stats socket {self.socket} mode 600 level admin
  stats socket ipv4@127.0.0.1:{self.api_port} level admin
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend front
  bind 127.0.0.1:{self.port}
  default_backend {self.backend}
backend {self.backend}
  server {self.server} 127.0.0.1:{backend_port}
"""
        )
        self.log = tmp / "haproxy.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [program("haproxy"), "-db", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(self.answers, timeout=15, interval=0.05)
        except AssertionError:
            stop(self.process)
            raise AssertionError(f"HAProxy did not start: {self.log.read_text()}") from None

    def answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"HAProxy exited: {self.log.read_text()}")
        try:
            return "Name: HAProxy" in self.api("show info")
        except OSError:
            return False

    def api(self, command: str) -> str:
        """One command over the unix stats socket, as the test's own check."""
        with socket.socket(socket.AF_UNIX) as connection:
            connection.settimeout(5)
            connection.connect(str(self.socket))
            connection.sendall(command.encode() + b"\n")
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        return answer.decode()

    def row(self) -> dict[str, str]:
        """This server's row of `show stat`, by column name."""
        header, *rows = (
            line for line in self.api(f"show stat {self.backend} 4 -1").splitlines() if line
        )
        names = header.lstrip("# ").split(",")
        for line in rows:
            values = dict(zip(names, line.split(",")))
            if values["svname"] == self.server:
                return values
        raise AssertionError(f"no row for {self.server}: {rows}")

    def admin_state(self) -> int:
        """srv_admin_state of `show servers state`: 0x08 is drain forced from the API."""
        lines = self.api(f"show servers state {self.backend}").splitlines()
        header = lines[1].lstrip("# ").split()
        for line in lines[2:]:
            values = dict(zip(header, line.split()))
            if values.get("srv_name") == self.server:
                return int(values["srv_admin_state"])
        raise AssertionError(f"no server state for {self.server}: {lines}")

    def in_drain(self) -> bool:
        return self.row()["status"] == "DRAIN" and bool(self.admin_state() & 0x08)

    def close(self) -> None:
        stop(self.process)


@pytest.fixture
def backend() -> Iterator[EchoBackend]:
    server = EchoBackend()
    yield server
    server.close()


@pytest.fixture
def haproxy(tmp_path: Path, backend: EchoBackend) -> Iterator[RealHAProxy]:
    program("socat")
    balancer = RealHAProxy(tmp_path, backend.port)
    yield balancer
    balancer.close()


def settings_for(haproxy: RealHAProxy, api: str) -> dict[str, str]:
    return {
        "HAPROXY_BACKEND": haproxy.backend,
        "HAPROXY_SERVER": haproxy.server,
        "HAPROXY_SOCKET": (
            str(haproxy.socket) if api == "unix" else f"tcp:127.0.0.1:{haproxy.api_port}"
        ),
    }


@pytest.mark.parametrize("api", ["unix", "tcp"])
def test_haproxy_drain_waits_for_the_open_session_then_ready_puts_it_back(
    tmp_path: Path, haproxy: RealHAProxy, backend: EchoBackend, api: str
) -> None:
    hooks = HookHost(tmp_path)
    hooks.settings = settings_for(haproxy, api)
    assert not haproxy.in_drain()

    # A client's session through HAProxy, established end to end: the backend has it and
    # echoed a byte back.
    client = socket.create_connection(("127.0.0.1", haproxy.port), timeout=10)
    try:
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        assert backend.connected.is_set()
        assert haproxy.row()["scur"] == "1"

        draining = hooks.run("prepare.d/30-haproxy-drain")
        assert draining.status == 75, draining.output
        assert "1 sessions" in draining.output
        assert haproxy.in_drain()
        # Run again (the agent does, after hooks.tempfail_retry_seconds): still not ready.
        assert hooks.run("prepare.d/30-haproxy-drain").status == 75
        # The session is still served while the server drains.
        client.sendall(b"y")
        assert client.recv(1) == b"y"
    finally:
        client.close()

    # Once HAProxy has seen the client go, the hook says drained.
    runs = []

    def drained() -> bool:
        runs.append(hooks.run("prepare.d/30-haproxy-drain"))
        assert runs[-1].status in (0, 75), runs[-1].output
        return runs[-1].status == 0

    wait_until(drained, timeout=20, interval=0.1)
    assert "no sessions left" in runs[-1].output
    assert haproxy.row()["scur"] == "0"
    assert haproxy.in_drain()

    ready = hooks.run("recover.d/70-haproxy-ready")
    assert ready.status == 0, ready.output
    assert not haproxy.in_drain()
    assert haproxy.admin_state() == 0
    assert haproxy.row()["status"] != "DRAIN"
    # Idempotent.
    assert hooks.run("recover.d/70-haproxy-ready").status == 0
    assert haproxy.admin_state() == 0


@pytest.mark.parametrize("name", ["prepare.d/30-haproxy-drain", "recover.d/70-haproxy-ready"])
@pytest.mark.parametrize(
    "wrong",
    [
        ("HAPROXY_SERVER", "web9", "No such server"),
        ("HAPROXY_BACKEND", "nosuchbackend", "No such backend"),
        ("HAPROXY_SERVER", "web1;shutdown", "is not an HAProxy name"),
    ],
    ids=["server", "backend", "not-a-name"],
)
def test_haproxy_hooks_fail_for_a_server_haproxy_does_not_have(
    tmp_path: Path, haproxy: RealHAProxy, name: str, wrong: tuple[str, str, str]
) -> None:
    setting, value, says = wrong
    hooks = HookHost(tmp_path)
    hooks.settings = {**settings_for(haproxy, "unix"), setting: value}
    result = hooks.run(name)
    assert result.status == 1, result.output
    assert says in result.output
    assert haproxy.admin_state() == 0
    assert haproxy.process.poll() is None


@pytest.mark.parametrize("name", ["prepare.d/30-haproxy-drain", "recover.d/70-haproxy-ready"])
@pytest.mark.parametrize("form", ["unix", "tcp", "bad"])
def test_haproxy_hooks_fail_when_the_api_cannot_be_reached(
    tmp_path: Path, name: str, form: str
) -> None:
    program("socat")
    hooks = HookHost(tmp_path)
    socket_setting = {
        "unix": str(tmp_path / "missing.sock"),
        # Nothing listens on a port just freed.
        "tcp": f"tcp:127.0.0.1:{free_port()}",
        "bad": "127.0.0.1:9999",
    }[form]
    hooks.settings = {"HAPROXY_BACKEND": "app", "HAPROXY_SOCKET": socket_setting}
    result = hooks.run(name)
    assert result.status != 0
    assert result.status != 75
    if form == "bad":
        assert "expected /path/to/admin.sock, unix:/path or tcp:HOST:PORT" in result.output
    else:
        assert f"cannot reach the HAProxy runtime API at {socket_setting}" in result.output


def shipped_nginx_location(flag: Path) -> str:
    """The nginx snippet in 20-lb-probe-down's header comment, pointed at ``flag``."""
    comment = [
        line[1:].strip()
        for line in (HOOKS / "prepare.d" / "20-lb-probe-down").read_text().splitlines()
        if line.startswith("#")
    ]
    start = comment.index("location = /healthz {")
    end = comment.index("}", start)
    snippet = "\n".join(comment[start : end + 1])
    assert "/run/scheduled-events-agent/drain" in snippet
    return snippet.replace("/run/scheduled-events-agent/drain", str(flag))


class RealNginx:
    def __init__(self, tmp: Path, location: str) -> None:
        self.port = free_port()
        prefix = tmp / "nginx"
        prefix.mkdir()
        # Run as root, nginx's workers would be nobody, who cannot see into the test's 0700
        # temporary directory (and so never find the flag).
        user = "user root;" if os.geteuid() == 0 else ""
        temp_paths = "".join(
            f"  {kind}_temp_path {prefix / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        config = prefix / "nginx.conf"
        config.write_text(
            f"""{user}
worker_processes 1;
error_log stderr;
pid {prefix / "nginx.pid"};
events {{ worker_connections 64; }}
http {{
  access_log off;
{temp_paths}
  server {{
    listen 127.0.0.1:{self.port};
    {location}
  }}
}}
"""
        )
        self.log = tmp / "nginx.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    program("nginx"),
                    "-e",
                    "stderr",
                    "-p",
                    str(prefix),
                    "-c",
                    str(config),
                    "-g",
                    "daemon off;",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(self.answers, timeout=15, interval=0.05)
        except AssertionError:
            stop(self.process)
            raise AssertionError(f"nginx did not start: {self.log.read_text()}") from None

    def answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"nginx exited: {self.log.read_text()}")
        try:
            self.health()
        except OSError:
            return False
        return True

    def health(self) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", "/healthz")
            return connection.getresponse().status
        finally:
            connection.close()

    def close(self) -> None:
        stop(self.process)


@pytest.mark.parametrize("wait", ["0", "1"])
def test_the_probe_pair_turns_a_real_nginx_health_check_503_then_200(
    tmp_path: Path, wait: str
) -> None:
    flag = tmp_path / "run" / "scheduled-events-agent" / "drain"
    nginx = RealNginx(tmp_path, shipped_nginx_location(flag))
    try:
        hooks = HookHost(tmp_path)
        hooks.settings = {"DRAIN_FLAG": str(flag), "LB_PROBE_WAIT_SECONDS": wait}
        assert nginx.health() == 200

        down = hooks.run("prepare.d/20-lb-probe-down")
        assert down.status == 0, down.output
        assert f"waiting {wait}s" in down.output
        assert down.seconds >= int(wait)
        assert nginx.health() == 503

        up = hooks.run("recover.d/80-lb-probe-up")
        assert up.status == 0, up.output
        assert nginx.health() == 200
    finally:
        nginx.close()
    assert re.search(r"\[(emerg|alert|crit)\]", nginx.log.read_text()) is None
