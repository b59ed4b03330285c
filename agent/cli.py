"""The command line: parses arguments, builds the real collaborators, and maps errors to exit codes.

Exit codes (SPEC section 3): 0 ok, 1 runtime failure, 2 usage or configuration error. An operator's
mistake gets a one-line message saying what, where, the value seen and a hint; never a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from agent import __version__

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.command == "emulator":
        return _run_emulator(parser, arguments)
    parser.error(f"unknown command {arguments.command}")


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
            f"scheduled-events-agent emulator: cannot listen on "
            f"{arguments.host}:{arguments.port}: {error.strerror} (try --port 0)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    stop = threading.Event()

    def request_stop(signal_number: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
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
