"""The command line: parses arguments, builds the real collaborators, and maps errors to exit codes.

Exit codes (README, Commands): 0 ok, 1 runtime failure, 2 usage or configuration error.
An operator's mistake gets a one-line message saying what, where, the value seen and a hint;
never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from agent import __version__, logs
from agent import config as config_module
from agent.clock import Clock, SystemClock
from agent.errors import AgentError, ConfigError, ImdsError

if TYPE_CHECKING:  # the commands import what they use when they run
    from agent.fleet import FleetGate
    from agent.imds import ImdsClient, InstanceMetadata
    from agent.metrics import Metrics
    from agent.state import Store

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
DEFAULT_EMULATOR_PORT = 8254


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scheduled-events-agent",
        description="Run your hooks before Azure maintains, reboots or evicts this VM.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    run = commands.add_parser("run", help="the daemon: poll, prepare, approve, recover")
    _config_option(run)
    run.add_argument("--once", action="store_true", help="one poll, handled fully, then exit")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="decide and log everything; run no hook, post nothing",
    )

    check = commands.add_parser("check-config", help="validate the configuration")
    _config_option(check)

    status = commands.add_parser("status", help="the events now pending and what was done")
    _config_option(status)
    status.add_argument("--json", action="store_true", help="JSON for scripts")

    history = commands.add_parser("history", help="past events from the state store")
    _config_option(history)
    history.add_argument("--json", action="store_true", help="JSON for scripts")
    history.add_argument("--limit", type=int, default=20, help="at most N events (default 20)")

    approve = commands.add_parser("approve", help="approve an event by hand")
    approve.add_argument("event_id", metavar="EVENT_ID")
    _config_option(approve)
    approve.add_argument(
        "--force", action="store_true", help="approve even an event shared with other VMs"
    )

    rehearse = commands.add_parser(
        "rehearse",
        help="run the prepare and recover hooks for a synthetic event on a private emulator",
    )
    _config_option(rehearse)
    rehearse.add_argument("--type", default="Preempt", help="event type (default Preempt)")
    rehearse.add_argument(
        "--notice",
        type=float,
        metavar="SECONDS",
        help="seconds from the event's arrival to NotBefore (default: the type's minimum)",
    )
    rehearse.add_argument(
        "--all-types",
        action="store_true",
        help="each type in events.types with its minimum notice, in one table",
    )
    rehearse.add_argument("--json", action="store_true", help="JSON for scripts")

    emulator = commands.add_parser(
        "emulator", help="serve an emulator of the IMDS endpoints, to rehearse hooks off Azure"
    )
    emulator.add_argument("--host", default="127.0.0.1", help="address to listen on")
    emulator.add_argument(
        "--port", type=int, default=DEFAULT_EMULATOR_PORT, help="port (0: any free one)"
    )
    emulator.add_argument("--vm-name", default="web_4", help="compute.name of the emulated VM")
    emulator.add_argument(
        "--scenario", metavar="NAME|FILE", help="replay a named timeline or a YAML timeline file"
    )
    emulator.add_argument(
        "--time-scale", type=float, default=1.0, help="run the scenario this many times faster"
    )
    emulator.add_argument(
        "--first-call-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="delay the first Scheduled Events answer, as a cold IMDS does",
    )
    emulator.add_argument(
        "--rate-limit",
        type=int,
        default=5,
        metavar="N",
        help="requests per second under /metadata/ before 429 (0 turns the limit off)",
    )
    emulator.add_argument(
        "--no-etag", action="store_true", help="send no ETag and ignore If-None-Match"
    )
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file (default {config_module.DEFAULT_PATH})",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.command == "emulator":
        return _run_emulator(parser, arguments)
    try:
        config = config_module.load(arguments.config)
    except ConfigError as error:
        print(f"scheduled-events-agent: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if arguments.command == "check-config":
            return _check_config(config, arguments)
        if arguments.command == "run":
            return _run_daemon(config, arguments)
        if arguments.command in ("status", "history"):
            return _report(config, arguments)
        if arguments.command == "approve":
            return _approve(config, arguments)
        if arguments.command == "rehearse":
            return _rehearse(parser, config, arguments)
    except AgentError as error:
        print(f"scheduled-events-agent {arguments.command}: {error}", file=sys.stderr)
        return EXIT_FAILURE
    parser.error(f"unknown command {arguments.command}")


def _check_config(config: config_module.Config, arguments: argparse.Namespace) -> int:
    """The file's keys were checked on load; now the paths it names."""
    from agent.preflight import check_paths

    path = arguments.config or config_module.DEFAULT_PATH
    if arguments.config is None and not config_module.DEFAULT_PATH.exists():
        print(f"{path}: no file there: the defaults apply (see config.example.yaml)")
    problems = check_paths(config, as_root=os.geteuid() == 0)
    for problem in problems:
        _say(f"scheduled-events-agent check-config: {path}: {problem}", file=sys.stderr)
    if problems:
        print(
            f"{len(problems)} problem{'s' if len(problems) != 1 else ''}: an event would"
            " find the agent unprepared",
            file=sys.stderr,
        )
        return EXIT_USAGE
    print(f"{path}: configuration is valid; its hook directories and state directory are usable")
    return EXIT_OK


def _install_stop_signals(stop: threading.Event) -> None:
    def request_stop(signal_number: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)


def _run_daemon(config: config_module.Config, arguments: argparse.Namespace) -> int:
    from agent.instance import AlreadyRunning, InstanceLock

    logs.configure(config.logging.format, config.logging.level)
    log = logs.get_logger("agent")
    lock = None
    if not arguments.dry_run:  # a dry run keeps its state in memory: nothing to share
        try:
            lock = InstanceLock(config.state.path).acquire()
        except AlreadyRunning as error:
            print(f"scheduled-events-agent run: {error}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as error:
            raise AgentError(
                f"cannot lock the state file {config.state.path}: {error.strerror} "
                "(check state.path and its directory's permissions)"
            ) from None
        if lock.fallback is not None:
            log.warning("agent.lock_fallback", reason=lock.fallback, locked=lock.path)
    try:
        return _run_locked(config, arguments, log)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(config: config_module.Config, arguments: argparse.Namespace, log: Any) -> int:
    from prometheus_client import CollectorRegistry

    from agent.arm import ArmClient
    from agent.daemon import Daemon, assemble
    from agent.exposition import MetricsServer
    from agent.imds import ImdsClient
    from agent.metrics import Metrics
    from agent.mirror import Mirror
    from agent.selfservice import SelfService
    from agent.state import Store
    from agent.systemd import Notifier

    registry = CollectorRegistry()
    stop = threading.Event()
    _install_stop_signals(stop)
    clock = SystemClock(stop)
    imds = ImdsClient(
        config.imds.url, api_version=config.imds.api_version, clock=clock, stop=stop, logger=log
    )
    vm_name, instance = _identify(config, imds, log)
    maintenance = config.maintenance.check_interval_seconds > 0
    arm = (
        ArmClient(config.arm.url, imds, clock=clock, stop=stop)
        if maintenance and instance is not None
        else None
    )
    # A dry run keeps its memory to itself: a later real run must not think work was done.
    store = Store(":memory:" if arguments.dry_run else config.state.path)
    metrics = Metrics(
        registry, fleet_backend=config.fleet.backend if config.fleet.url is not None else None
    )
    # A dry run takes no slot: it would keep other VMs waiting for nothing.
    fleet = (
        None
        if arguments.dry_run
        else _fleet_gate(
            config,
            vm_name=vm_name,
            imds=imds,
            store=store,
            metrics=metrics,
            clock=clock,
            stop=stop,
        )
    )
    failpoints = os.environ.get("SCHEDULED_EVENTS_AGENT_FAILPOINTS", "")
    parts = assemble(
        config,
        imds=imds,
        store=store,
        clock=clock,
        stop=stop,
        log=log,
        vm_name=vm_name,
        dry_run=arguments.dry_run,
        check_ownership=os.geteuid() == 0,
        failpoints=frozenset(name for name in failpoints.split(",") if name),
        metrics=metrics,
        notifier=Notifier(),
        fleet=fleet,
    )
    self_service = None
    if arm is not None and instance is not None:
        self_service = SelfService(
            config=config,
            arm=arm,
            instance=instance,
            store=store,
            metrics=metrics,
            clock=clock,
            stop=stop,
            log=log.bind(vm_name=vm_name),
            dry_run=arguments.dry_run,
            fleet=fleet,
        )
    daemon = Daemon(parts, self_service=self_service)
    server = None
    if config.metrics.listen is not None and not arguments.once:
        try:
            mirror = Mirror(imds.copy, api_version=config.imds.api_version, now=clock.monotonic)
            server = MetricsServer(
                config.metrics.listen, registry, daemon.health, mirror, daemon.live_status
            ).start()
        except OSError as error:
            store.close()
            imds.close()
            raise AgentError(
                f"metrics: cannot listen on {config.metrics.listen}: {error.strerror} "
                "(another agent running? change metrics.listen, or null turns metrics off)"
            ) from None
        log.info(
            "metrics.serving",
            url=f"{server.url}/metrics",
            mirror=f"{server.url}/metadata/scheduledevents?api-version={config.imds.api_version}",
        )
    try:
        return daemon.run_once() if arguments.once else daemon.run()
    finally:
        if server is not None:
            server.stop()
        store.close()
        imds.close()
        if arm is not None:
            arm.close()
        if fleet is not None:
            fleet.close()


def _identify(
    config: config_module.Config, imds: ImdsClient, log: Any
) -> tuple[str, InstanceMetadata | None]:
    """This VM's name (configured, else from instance metadata) and, when the maintenance
    windows are read, its instance metadata."""
    vm_name = config.vm_name
    instance = None
    if vm_name is None:
        # The first call may wake a cold IMDS, which takes up to two minutes.
        instance = imds.fetch_instance_metadata(budget_seconds=150)
        log.info("agent.vm_name", vm_name=instance.name, source="instance metadata")
        return instance.name, instance
    if config.maintenance.check_interval_seconds > 0:
        try:
            instance = imds.fetch_instance_metadata(budget_seconds=10)
        except ImdsError as error:
            # Scheduled Events matter more than the windows: go on without them.
            log.error(
                "maintenance.disabled",
                reason=f"no instance metadata, so no resourceId to read the windows of: {error}",
            )
    return vm_name, instance


def _fleet_gate(
    config: config_module.Config,
    *,
    vm_name: str,
    imds: ImdsClient,
    store: Store,
    metrics: Metrics,
    clock: Clock,
    stop: threading.Event,
) -> FleetGate | None:
    from agent.fleet import gate_for

    if config.fleet.url is None:
        return None
    return gate_for(
        config.fleet,
        holder=config.fleet.id or vm_name,
        imds=imds,
        store=store,
        metrics=metrics,
        clock=clock,
        stop=stop,
        log=logs.get_logger("agent"),
        env=os.environ,
    )


def _report(config: config_module.Config, arguments: argparse.Namespace) -> int:
    from agent import report
    from agent.state import Store

    if arguments.command == "status":
        live = _live_status(config)
        if live is not None:
            status = live
            if config.fleet.url is not None:
                status["fleet"] = {**(status["fleet"] or {}), **_fleet_holders(config)}
            print(json.dumps(status, indent=2) if arguments.json else report.status_text(status))
            return EXIT_OK
    store = Store(config.state.path, read_only=True)
    try:
        if arguments.command == "status":
            status = report.status(store)
            status["source"] = "store"
            if config.metrics.listen is not None:
                status["source_note"] = f"no agent answering on {config.metrics.listen}"
            if config.fleet.url is not None:
                status["fleet"] = {**(status["fleet"] or {}), **_fleet_holders(config)}
            print(json.dumps(status, indent=2) if arguments.json else report.status_text(status))
        else:
            if arguments.limit < 1:
                print("scheduled-events-agent history: --limit must be >= 1", file=sys.stderr)
                return EXIT_USAGE
            events = report.history(store, arguments.limit)
            print(json.dumps(events, indent=2) if arguments.json else report.history_text(events))
    finally:
        store.close()
    return EXIT_OK


def _live_status(config: config_module.Config) -> dict[str, Any] | None:
    """The running daemon's own status over its listener, if it answers for this state file
    (not a dry run's memory, nor another agent's); None otherwise."""
    import requests

    if config.metrics.listen is None:
        return None
    host, _, port = config.metrics.listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):  # noqa: S104 (listening everywhere: ask it on loopback)
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    session = requests.Session()
    session.trust_env = False  # never through a proxy: this is the machine's own listener
    try:
        answer = session.get(f"http://{host}:{port}/status", timeout=(1, 5))
        status = answer.json() if answer.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None
    finally:
        session.close()
    if not isinstance(status, dict) or status.get("source") != "live":
        return None
    ours = os.path.realpath(config.state.path)
    if (
        not isinstance(status.get("state_path"), str)
        or os.path.realpath(status["state_path"]) != ours
    ):
        return None
    return status


def _fleet_holders(config: config_module.Config) -> dict[str, object]:
    """Who holds the group's slots, asked of the coordinator (blob: the slots' metadata)."""
    from dataclasses import asdict

    from agent.fleet import FleetError, build_backend
    from agent.imds import ImdsClient, RetryPolicy

    fleet = config.fleet
    view: dict[str, object] = {"backend": fleet.backend, "group": fleet.group}
    if fleet.backend == "blob":
        view["slots"] = fleet.slots
    clock = SystemClock()
    imds = ImdsClient(config.imds.url, clock=clock, retry=RetryPolicy(budget_seconds=5))
    try:
        backend = build_backend(
            fleet, fleet.id or config.vm_name or "-", imds, os.environ, clock=clock
        )
        try:
            slots = backend.describe()
            queue = backend.queue()
        finally:
            backend.close()
        view["holders"] = None if slots is None else [asdict(slot) for slot in slots]
        view["queue"] = None if queue is None else [asdict(waiter) for waiter in queue]
        if slots is None:
            view["holders_error"] = "a FleetLock server does not say who holds its slots"
    except (FleetError, AgentError) as error:
        view["holders"] = None
        view["holders_error"] = str(error)
    finally:
        imds.close()
    return view


def _say(text: str, **options: Any) -> None:
    """Print a line that holds data from a document: control characters escaped."""
    from agent.logs import printable

    print(printable(text), **options)


def _approve(config: config_module.Config, arguments: argparse.Namespace) -> int:
    from agent.imds import ImdsClient
    from agent.state import Store

    clock = SystemClock()
    imds = ImdsClient(config.imds.url, api_version=config.imds.api_version, clock=clock)
    vm_name = config.vm_name or imds.fetch_instance_metadata().name
    document = imds.fetch_scheduled_events()
    event = document.find(arguments.event_id)
    prefix = f"scheduled-events-agent approve: event {arguments.event_id}"
    if event is None:
        _say(
            f"{prefix} is not in the document (ids now: "
            f"{', '.join(e.event_id for e in document.events) or 'none'})",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if event.status != "Scheduled":
        _say(f"{prefix} is {event.status}: there is nothing to approve", file=sys.stderr)
        return EXIT_FAILURE
    others = [name for name in event.resources if name.lower() != vm_name.lower()]
    if others and not arguments.force:
        _say(
            f"{prefix} also names {', '.join(others)}: approving releases them too, ready or "
            "not (use --force if that is what you want)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    store = Store(config.state.path)
    try:
        if store.approval_may_have_landed(event.key) and not arguments.force:
            _say(
                f"{prefix} was approved already (see status; --force sends it again)",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        approval_id = store.approval_started(event.key, "manual", clock.now())
        try:
            imds.approve([event.event_id])
        except AgentError as error:
            store.approval_finished(approval_id, "failed", clock.now(), str(error))
            raise
        store.approval_finished(approval_id, "succeeded", clock.now())
    finally:
        store.close()
        imds.close()
    _say(f"approved {event.event_id} ({event.event_type}, {' '.join(event.resources)})")
    return EXIT_OK


def _rehearse(
    parser: argparse.ArgumentParser, config: config_module.Config, arguments: argparse.Namespace
) -> int:
    from agent.events import KNOWN_TYPES
    from agent.rehearse import as_json, default_notice, rehearse, table, text

    if arguments.type not in KNOWN_TYPES:
        parser.error(f"--type must be one of {', '.join(KNOWN_TYPES)}, got {arguments.type!r}")
    if arguments.notice is not None and not 0 < arguments.notice <= 7 * 24 * 3600:
        parser.error(
            f"--notice must be more than 0 seconds and at most a week, got {arguments.notice}"
        )
    logs.configure(config.logging.format, "warning")  # the report is the output
    types = list(config.events.types) if arguments.all_types else [arguments.type]
    results = [
        rehearse(
            config,
            event_type,
            arguments.notice
            if arguments.notice is not None and not arguments.all_types
            else default_notice(event_type),
        )
        for event_type in types
    ]
    if arguments.json:
        print(json.dumps([as_json(result) for result in results], indent=2))
    elif arguments.all_types:
        print(table(results))
    else:
        print(text(results[0]))
    return EXIT_OK if all(result.fits for result in results) else EXIT_FAILURE


def _listen_advice(error: OSError, arguments: argparse.Namespace) -> str:
    """What to change when the emulator cannot listen where it was asked to."""
    if error.errno == errno.EADDRINUSE:
        return (
            f"port {arguments.port} is taken: choose another --port, or --port 0 for any free one"
        )
    if error.errno == errno.EACCES:
        return f"port {arguments.port} needs privileges: choose a --port above 1023"
    return (
        f"--host {arguments.host} is not an address of this machine: "
        "use one it has, such as 127.0.0.1"
    )


def _run_emulator(parser: argparse.ArgumentParser, arguments: argparse.Namespace) -> int:
    # Imported here: the agent's other commands must not pay for the emulator.
    from agent.emulator.scenarios import ScenarioError, load
    from agent.emulator.server import EmulatorServer
    from agent.emulator.world import World

    if arguments.time_scale <= 0:
        parser.error(f"--time-scale must be > 0, got {arguments.time_scale}")
    if arguments.first_call_delay < 0:
        parser.error(f"--first-call-delay must be >= 0, got {arguments.first_call_delay}")
    if arguments.rate_limit < 0:
        parser.error(f"--rate-limit must be >= 0, got {arguments.rate_limit}")
    if not 0 <= arguments.port <= 65535:
        parser.error(f"--port must be 0 to 65535 (0: any free port), got {arguments.port}")
    world = World(vm_name=arguments.vm_name)
    scenario = None
    if arguments.scenario:
        try:
            scenario = load(arguments.scenario, arguments.time_scale)
        except ScenarioError as error:
            print(f"scheduled-events-agent emulator: {error}", file=sys.stderr)
            return EXIT_USAGE
    try:
        server = EmulatorServer(
            world,
            arguments.host,
            arguments.port,
            rate_limit=arguments.rate_limit or None,
            first_call_delay_seconds=arguments.first_call_delay,
            etag=not arguments.no_etag,
        )
    except OSError as error:
        print(
            f"scheduled-events-agent emulator: cannot listen on {arguments.host}:"
            f"{arguments.port}: {error.strerror or error} ({_listen_advice(error, arguments)})",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    stop = threading.Event()
    _install_stop_signals(stop)
    if scenario is not None:
        scenario.attach(world)
    server.start()
    suffix = f", scenario {scenario.name} at x{arguments.time_scale:g}" if scenario else ""
    print(
        f"scheduled-events-agent emulator: serving {server.url} (vm {world.vm_name}{suffix})",
        flush=True,
    )
    stop.wait()
    server.stop()
    print("scheduled-events-agent emulator: stopped", flush=True)
    return EXIT_OK
