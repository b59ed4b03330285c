"""The configuration: YAML into frozen dataclasses, every problem reported at once by key path.

Invariants (README, Configuration):
- Every key is optional; its default is the dataclass default, documented in
  ``config.example.yaml`` (a test loads that file and compares it with these defaults).
- Unknown keys are errors, and so are values of the wrong type or out of range: no silent
  fallback. ``load`` raises one ConfigError listing every problem as ``dotted.path: message``.
- ``check-config`` and ``run`` both go through ``load``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import yaml

from agent.errors import ConfigError
from agent.events import KNOWN_TYPES
from agent.maintenance import Slot

DEFAULT_PATH = Path("/etc/scheduled-events-agent/config.yaml")
DEFAULT_METRICS_PORT = 9469
SCHEDULED_EVENTS_VERSIONS = (
    "2017-03-01",
    "2017-08-01",
    "2017-11-01",
    "2019-01-01",
    "2019-04-01",
    "2019-08-01",
    "2020-07-01",
)


@dataclass(frozen=True)
class ImdsConfig:
    url: str = "http://169.254.169.254"
    api_version: str = "2020-07-01"
    poll_interval_seconds: float = 1.0


@dataclass(frozen=True)
class HooksConfig:
    prepare_dir: str = "/etc/scheduled-events-agent/prepare.d"
    recover_dir: str = "/etc/scheduled-events-agent/recover.d"
    timeout_seconds: float = 300.0
    kill_grace_seconds: float = 10.0
    tempfail_retry_seconds: float = 5.0
    # Hooks get a clean environment; these names are passed through from the agent's own, and
    # these fixed values set (e.g. KUBECONFIG). The agent's variables are never passed.
    pass_environment: tuple[str, ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict)
    # Hook file name -> the event types it runs for; a hook not named runs for every type.
    event_types: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # No hook runs for a Freeze of at most this many seconds (0: always run them); such an
    # event is then approved at once ("approve") or left to Azure ("leave").
    skip_freeze_up_to_seconds: float = 0.0
    skipped_events: str = "leave"


@dataclass(frozen=True)
class EventsConfig:
    types: tuple[str, ...] = KNOWN_TYPES
    # An event counts as gone only after this long absent from successful polls.
    gone_grace_seconds: float = 5.0


@dataclass(frozen=True)
class ApprovalConfig:
    mode: str = "on-success"
    shared_events: str = "skip"


@dataclass(frozen=True)
class StateConfig:
    path: str = "/var/lib/scheduled-events-agent/state.db"


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = f"127.0.0.1:{DEFAULT_METRICS_PORT}"
    # The listener serves the metrics, /healthz and a copy of the document: beyond loopback
    # only when the operator says so.
    allow_non_loopback: bool = False


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "auto"
    level: str = "info"


@dataclass(frozen=True)
class ArmConfig:
    url: str = "https://management.azure.com"


@dataclass(frozen=True)
class SelfServiceConfig:
    enabled: bool = False
    slots: tuple[str, ...] = ()
    time_zone: str = "UTC"
    update_domain_spacing_minutes: float = 30.0


@dataclass(frozen=True)
class MaintenanceConfig:
    check_interval_seconds: float = 3600.0  # 0: never read the windows (no identity needed)
    self_service: SelfServiceConfig = field(default_factory=SelfServiceConfig)


@dataclass(frozen=True)
class FleetConfig:
    url: str | None = None  # None: no coordination; else the container (blob) or server URL
    backend: str = "blob"
    group: str = "default"
    slots: int = 1
    lease_seconds: int = 60
    retry_seconds: float = 5.0
    # How long a VM down for the maintenance it was approved for keeps its slot after its
    # last sign of life (a Redeploy takes up to 15 minutes, after up to 15 of waiting).
    max_down_seconds: int = 1800
    settle_seconds: float = 0.0  # the slot kept this long after the recover hooks
    id: str | None = None  # this agent in the group; None: the VM's name
    sas_token: str | None = None
    account_key: str | None = None


@dataclass(frozen=True)
class Config:
    imds: ImdsConfig = field(default_factory=ImdsConfig)
    vm_name: str | None = None
    hooks: HooksConfig = field(default_factory=HooksConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    approval: ApprovalConfig = field(default_factory=ApprovalConfig)
    state: StateConfig = field(default_factory=StateConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    arm: ArmConfig = field(default_factory=ArmConfig)
    maintenance: MaintenanceConfig = field(default_factory=MaintenanceConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)


# A message when the value is wrong, else None; for a mapping, a list of "key: message", one
# per problem. (Optional and Union: evaluated at run time on 3.9.)
Check = Callable[[Any], Union[str, list[str], None]]


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "expected a non-empty string"


def _url(value: Any) -> str | None:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        return f"expected an http:// URL, got {value!r}"
    return None


def _positive(maximum: float) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number of seconds, got {value!r}"
        if not 0 < value <= maximum:
            return f"expected more than 0 and at most {maximum:g}, got {value!r}"
        return None

    return check


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        if value not in choices:
            return f"expected one of {', '.join(choices)}, got {value!r}"
        return None

    return check


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {value!r}"


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _types(value: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return f"expected a list of event types, got {value!r}"
    unknown = [item for item in value if item not in KNOWN_TYPES]
    if unknown:
        return f"unknown event types {unknown} (known: {', '.join(KNOWN_TYPES)})"
    return None


def _listen(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or ":" not in value:
        return f"expected HOST:PORT or null, got {value!r}"
    port = value.rsplit(":", 1)[1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        return f"expected a port from 1 to 65535 after the colon, got {value!r}"
    return None


def _non_negative(maximum: float) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {value!r}"
        if not 0 <= value <= maximum:
            return f"expected 0 to {maximum:g}, got {value!r}"
        return None

    return check


def _integer(minimum: int, maximum: int) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected a whole number, got {value!r}"
        if not minimum <= value <= maximum:
            return f"expected {minimum} to {maximum}, got {value!r}"
        return None

    return check


def _optional_url(value: Any) -> str | None:
    return None if value is None else _url(value)


def _group(value: Any) -> str | None:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", value):
        return f"expected letters, digits, '.', '_' or '-' (at most 63), got {value!r}"
    return None


def _account_key(value: Any) -> str | None:
    if value is None:
        return None
    try:
        base64.b64decode(str(value), validate=True)
    except ValueError:
        return "expected the base64 account key (az storage account keys list)"
    return _text(value)


_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _variable_problem(name: Any) -> str | None:
    if not isinstance(name, str) or not _VARIABLE.fullmatch(name):
        return f"{name!r} is not a variable name"
    if name.startswith(("SCHEDULED_EVENTS_AGENT_", "SCHEDULED_EVENT_")):
        return (
            f"{name} is the agent's own (SCHEDULED_EVENTS_AGENT_*) or set by it"
            " (SCHEDULED_EVENT_*): it cannot be given to hooks"
        )
    return None


def _variable_names(value: Any) -> str | None:
    if not isinstance(value, list):
        return f"expected a list of variable names like [KUBECONFIG, https_proxy], got {value!r}"
    return "; ".join(filter(None, map(_variable_problem, value))) or None


def _variable_values(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"expected a mapping like {{KUBECONFIG: /etc/kubernetes/admin.conf}}, got {value!r}"
    problems = [problem for problem in map(_variable_problem, value) if problem]
    problems += [
        f"{name}: expected a text value without NUL, got {item!r}"
        for name, item in value.items()
        if not isinstance(item, str) or "\x00" in item
    ]
    return "; ".join(problems) or None


def _hook_types(value: Any) -> str | None:
    example = "{50-k8s-drain: [Reboot, Redeploy, Preempt, Terminate]}"
    if not isinstance(value, dict):
        return f"expected a mapping of hook file name to event types like {example}"
    problems = []
    for name, types in value.items():
        if not isinstance(name, str) or not name or "/" in name:
            problems.append(f"{name!r}: expected a hook's file name (no directory)")
        elif not isinstance(types, list) or not types:
            problems.append(f"{name}: expected a list of event types, got {types!r}")
        else:
            message = _types(types)
            if message:
                problems.append(f"{name}: {message}")
    return "; ".join(problems) or None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (of ``metrics.listen``) is this machine's loopback; empty means
    127.0.0.1."""
    host = host.strip("[]")
    if host in ("", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost may resolve to any address
        return False


def _self_service(value: Any) -> str | list[str] | None:
    if not isinstance(value, dict):
        return f"expected a mapping, got {value!r}"
    known = [f.name for f in dataclasses.fields(SelfServiceConfig)]
    problems = [
        f"{key}: unknown key (known: {', '.join(known)})" for key in value if key not in known
    ]
    if "enabled" in value and not isinstance(value["enabled"], bool):
        problems.append(f"enabled: expected true or false, got {value['enabled']!r}")
    slots = value.get("slots", [])
    if not isinstance(slots, list) or not all(isinstance(slot, str) for slot in slots):
        problems.append("slots: expected a list like ['Sun 02:00-04:00']")
    else:
        for slot in slots:
            try:
                Slot.parse(slot)
            except ValueError as error:
                problems.append(f"slots: {error}")
    zone = value.get("time_zone", "UTC")
    try:
        ZoneInfo(str(zone))
    except (ValueError, KeyError, OSError):
        problems.append(f"time_zone: unknown time zone {zone!r} (an IANA name like Europe/Berlin)")
    spacing = value.get("update_domain_spacing_minutes", 30)
    message = _non_negative(24 * 60)(spacing)
    if message:
        problems.append(f"update_domain_spacing_minutes: {message}")
    return problems


# What each key accepts; the sections mirror the dataclasses above.
_SECTIONS: dict[str, tuple[type[Any], dict[str, Check]]] = {
    "imds": (
        ImdsConfig,
        {
            "url": _url,
            "api_version": _one_of(*SCHEDULED_EVENTS_VERSIONS),
            "poll_interval_seconds": _positive(60),
        },
    ),
    "hooks": (
        HooksConfig,
        {
            "prepare_dir": _text,
            "recover_dir": _text,
            "timeout_seconds": _positive(24 * 3600),
            "kill_grace_seconds": _positive(600),
            "tempfail_retry_seconds": _positive(600),
            "pass_environment": _variable_names,
            "environment": _variable_values,
            "event_types": _hook_types,
            "skip_freeze_up_to_seconds": _non_negative(3600),
            "skipped_events": _one_of("approve", "leave"),
        },
    ),
    "events": (
        EventsConfig,
        {"types": _types, "gone_grace_seconds": _non_negative(600)},
    ),
    "approval": (
        ApprovalConfig,
        {
            "mode": _one_of("on-success", "always", "never"),
            "shared_events": _one_of("skip", "approve"),
        },
    ),
    "state": (StateConfig, {"path": _text}),
    "metrics": (MetricsConfig, {"listen": _listen, "allow_non_loopback": _boolean}),
    "arm": (ArmConfig, {"url": _url}),
    "maintenance": (
        MaintenanceConfig,
        {"check_interval_seconds": _non_negative(7 * 24 * 3600), "self_service": _self_service},
    ),
    "fleet": (
        FleetConfig,
        {
            "url": _optional_url,
            "backend": _one_of("blob", "fleetlock"),
            "group": _group,
            "slots": _integer(1, 1000),
            # Azure's limits for a lease that expires: 15 to 60 seconds.
            "lease_seconds": _integer(15, 60),
            "retry_seconds": _positive(300),
            "max_down_seconds": _integer(0, 7 * 24 * 3600),
            "settle_seconds": _non_negative(3600),
            "id": _optional_text,
            "sas_token": _optional_text,
            "account_key": _account_key,
        },
    ),
    "logging": (
        LoggingConfig,
        {
            "format": _one_of("auto", "json", "console"),
            "level": _one_of("debug", "info", "warning", "error"),
        },
    ),
}


def parse(data: Any, source: str = "<config>") -> Config:
    """Build a Config from decoded YAML; raise ConfigError listing every problem."""
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): expected a mapping, got {type(data).__name__}"])
    sections: dict[str, Any] = {}
    for key, value in data.items():
        if key == "vm_name":
            message = _optional_text(value)
            if message:
                problems.append(f"vm_name: {message}")
            else:
                sections["vm_name"] = value
            continue
        if key not in _SECTIONS:
            problems.append(f"{key}: unknown key (known: vm_name, {', '.join(_SECTIONS)})")
            continue
        built = _section(key, value, problems)
        if built is not None:
            sections[key] = built
    fleet = sections.get("fleet")
    if isinstance(fleet, FleetConfig):
        problems.extend(_fleet_problems(fleet))
    metrics = sections.get("metrics")
    if isinstance(metrics, MetricsConfig):
        problems.extend(_metrics_problems(metrics))
    if problems:
        raise ConfigError(source, problems)
    return Config(**sections)


def account_name(container_url: str) -> str:
    """The storage account of a container URL: ``https://ACCOUNT.blob.core.windows.net/c``, or
    the first path segment for the path-style URLs of emulators (``http://127.0.0.1:10000/ACCOUNT/c``)."""
    parts = urlsplit(container_url)
    host = parts.hostname or ""
    if ".blob." in host:
        return host.split(".", 1)[0]
    segments = [segment for segment in parts.path.split("/") if segment]
    if len(segments) < 2:
        raise ValueError(
            f"cannot tell the storage account from {container_url!r}: expected "
            "https://ACCOUNT.blob.core.windows.net/CONTAINER or http://HOST:PORT/ACCOUNT/CONTAINER"
        )
    return segments[0]


def _fleet_problems(fleet: FleetConfig) -> list[str]:
    """What no single key shows: the keys of the fleet section that do not go together."""
    problems = []
    if fleet.sas_token is not None and fleet.account_key is not None:
        problems.append("fleet: give sas_token or account_key, not both")
    if fleet.url is not None and fleet.backend == "blob":
        try:
            account_name(fleet.url)
        except ValueError as error:
            problems.append(f"fleet.url: {error}")
    return problems


def _metrics_problems(metrics: MetricsConfig) -> list[str]:
    if metrics.listen is None or metrics.allow_non_loopback:
        return []
    host = metrics.listen.rpartition(":")[0]
    if is_loopback(host):
        return []
    return [
        f"metrics.listen: {metrics.listen!r} is not a loopback address: the metrics, /healthz "
        "and the copy of the document would be open to the network (use 127.0.0.1 or [::1], "
        "or set metrics.allow_non_loopback: true if that is what you want)"
    ]


def _section(name: str, value: Any, problems: list[str]) -> Any:
    cls, checks = _SECTIONS[name]
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append(f"{name}: expected a mapping, got {value!r}")
        return None
    values: dict[str, Any] = {}
    before = len(problems)
    for key, raw in value.items():
        if key not in checks:
            problems.append(f"{name}.{key}: unknown key (known: {', '.join(checks)})")
            continue
        # Unquoted, YAML reads 2020-07-01 as a date.
        dated = key == "api_version" and isinstance(raw, datetime.date)
        item = raw.isoformat() if dated else raw
        message = checks[key](item)
        if isinstance(message, list):
            problems.extend(f"{name}.{key}.{entry}" for entry in message)
            if message:
                continue
        elif message:
            problems.append(f"{name}.{key}: {message}")
            continue
        if key == "event_types":
            values[key] = {name: tuple(types) for name, types in item.items()}
            continue
        if key == "self_service":
            settings: dict[str, Any] = {
                name: tuple(setting) if isinstance(setting, list) else setting
                for name, setting in item.items()
            }
            values[key] = SelfServiceConfig(**settings)
            continue
        values[key] = tuple(item) if isinstance(item, list) else item
    if len(problems) > before:
        return None
    defaults = {f.name for f in dataclasses.fields(cls)}
    assert set(values) <= defaults  # the checks table and the dataclass agree
    return cls(**values)


def load(path: Path | str | None = None) -> Config:
    """Load the file at ``path``. The default path may be absent (defaults then apply);
    a path given explicitly must exist."""
    explicit = path is not None
    config_path = Path(path) if path is not None else DEFAULT_PATH
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(
                str(config_path), ["(file): not found (copy config.example.yaml there?)"]
            ) from None
        return Config()
    except OSError as error:
        raise ConfigError(str(config_path), [f"(file): cannot read it: {error.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        if isinstance(error, yaml.MarkedYAMLError):  # say the file, not "<unicode string>"
            for mark in (error.context_mark, error.problem_mark):
                if mark is not None:
                    mark.name = str(config_path)
        raise ConfigError(str(config_path), [f"(file): not valid YAML: {error}"]) from None
    return parse(data, str(config_path))
