"""Fleet coordination: at most N VMs of a group take their maintenance early at the same time.

A group has N slots. An agent approves an event early, or starts a self-service maintenance, only
while it holds one; prepare and recover hooks never wait for one. Two coordinators are supported:

- ``blob`` (default): the slots are N blobs ``{group}/slot-{i}`` in an Azure Storage container, and
  holding a slot is holding that blob's lease (``fleet.lease_seconds``, 15 to 60 s, renewed while
  held), so a holder that dies loses its slot by itself within the lease. The holder's VM, event
  and start time go into the blob's metadata, for ``status``. The lease id is derived from the
  group and this agent's id, so that an agent that restarts can give back what it held before.
  Authorised by the VM's managed identity, a SAS token or the account key.
- ``fleetlock``: a FleetLock server (the protocol Zincati defines): ``POST /v1/pre-reboot`` takes a
  slot, ``POST /v1/steady-state`` gives it back; the server keeps the count and owns expiry.

Invariants:
- Fail safe: when the coordinator cannot be reached or refuses us, we hold no slot, so nothing is
  approved early; Azure still acts at NotBefore. A failure is logged once per change and counted.
- One slot per agent, whatever the number of its events that need it; it is given back when the
  last of them is over and its recover hooks ran (the daemon calls ``release``).
- A slot whose lease could not be renewed in time is not used for new approvals.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit
from xml.etree import ElementTree

import requests

from agent.clock import Clock
from agent.config import FleetConfig, account_name
from agent.errors import AgentError, ImdsError, ImdsRequestRejected
from agent.http import DeadlineSession, json_value
from agent.imds import ImdsClient, TokenCache
from agent.metrics import Metrics
from agent.state import Store

STORAGE_RESOURCE = "https://storage.azure.com/"
STORAGE_VERSION = "2021-08-06"
ROLE = "Storage Blob Data Contributor"
SAS_ENVIRONMENT = "SCHEDULED_EVENTS_AGENT_FLEET_SAS_TOKEN"
KEY_ENVIRONMENT = "SCHEDULED_EVENTS_AGENT_FLEET_ACCOUNT_KEY"
MAX_LIST_BYTES = 1024 * 1024
TICK_SECONDS = 1.0
_T = TypeVar("_T")


class FleetError(AgentError):
    """A call to the coordinator failed; ``reason`` is one of metrics.FLEET_ERRORS."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Attempt:
    """The outcome of asking for a slot: the slot's name, or None and why not."""

    slot: str | None
    detail: str = ""


@dataclass(frozen=True)
class SlotView:
    name: str
    held: bool
    holder: str | None = None
    event_id: str | None = None
    since: str | None = None


class Backend(Protocol):
    name: str
    slots: int | None  # how many the group has; None: the coordinator keeps the count
    lease_seconds: int | None  # how long a held slot lasts unrenewed; None: until given back

    def acquire(self, event_id: str, since: str) -> Attempt: ...

    def renew(self, slot: str) -> bool: ...

    def release(self, slot: str | None) -> None: ...

    def describe(self) -> list[SlotView] | None: ...

    def close(self) -> None: ...


# Azure Blob Storage ----------------------------------------------------------------------------


def shared_key_signature(
    method: str, url: str, headers: Mapping[str, str], account: str, key: bytes
) -> str:
    """The ``Authorization`` value for Shared Key authorisation of the Blob service."""

    def header(name: str) -> str:
        for candidate, value in headers.items():
            if candidate.lower() == name.lower():
                return value
        return ""

    length = header("Content-Length")
    standard = [
        method,
        header("Content-Encoding"),
        header("Content-Language"),
        "" if length == "0" else length,
        header("Content-MD5"),
        header("Content-Type"),
        header("Date"),
        header("If-Modified-Since"),
        header("If-Match"),
        header("If-None-Match"),
        header("If-Unmodified-Since"),
        header("Range"),
    ]
    ms_headers = sorted(
        (name.lower(), " ".join(value.split()))
        for name, value in headers.items()
        if name.lower().startswith("x-ms-")
    )
    parts = urlsplit(url)
    resource = f"/{account}{parts.path or '/'}"
    parameters: dict[str, list[str]] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        parameters.setdefault(name.lower(), []).append(value)
    for name in sorted(parameters):
        resource += f"\n{name}:{','.join(sorted(parameters[name]))}"
    text = "\n".join(standard) + "\n" + "".join(f"{n}:{v}\n" for n, v in ms_headers) + resource
    digest = hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()
    return f"SharedKey {account}:{base64.b64encode(digest).decode('ascii')}"


class BlobSlots:
    name = "blob"

    def __init__(
        self,
        container_url: str,
        group: str,
        *,
        slots: int,
        lease_seconds: int,
        holder: str,
        sas_token: str | None = None,
        account_key: str | None = None,
        token: TokenCache | None = None,
        timeout_seconds: float = 5.0,
        stop: threading.Event | None = None,
    ) -> None:
        self._container = container_url.rstrip("/")
        self._group = group
        self.slots: int | None = slots
        self.lease_seconds: int | None = lease_seconds
        self._holder = holder
        self._sas = sas_token.lstrip("?") if sas_token else None
        self._account = account_name(self._container)
        self._key = base64.b64decode(account_key) if account_key else None
        self._token = token
        self._timeout = timeout_seconds
        # The same id after a restart: what this agent held before can be given back.
        self.lease_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self._container}/{group}/{holder}"))
        # Storage is reached directly, as configured; each call within its whole timeout.
        self._session = DeadlineSession(stop=stop)
        self._session.headers["User-Agent"] = "scheduled-events-agent"

    def close(self) -> None:
        self._session.close()

    def slot_names(self) -> list[str]:
        return [f"{self._group}/slot-{index}" for index in range(self.slots or 0)]

    def acquire(self, event_id: str, since: str) -> Attempt:
        names = self.slot_names()
        # Start at a slot of our own, so that agents do not all queue on slot 0.
        first = zlib.crc32(self._holder.encode("utf-8")) % len(names)
        for name in names[first:] + names[:first]:
            response = self._lease(name, "acquire")
            if response.status_code == 404:
                self._create(name)
                response = self._lease(name, "acquire")
            if response.status_code == 201:
                self._describe_holder(name, event_id, since)
                return Attempt(name)
            if response.status_code != 409:
                raise self._unexpected(response, f"taking the lease of {name}")
        return Attempt(None, f"all {len(names)} slot(s) of group {self._group} are held")

    def renew(self, slot: str) -> bool:
        response = self._lease(slot, "renew")
        if response.status_code == 200:
            return True
        if response.status_code in (404, 409):
            return False  # leased by another since, or deleted
        raise self._unexpected(response, f"renewing the lease of {slot}")

    def release(self, slot: str | None) -> None:
        """Give back ``slot``, or (None) any slot this agent's lease id may still hold."""
        for name in [slot] if slot is not None else self.slot_names():
            self._describe_holder(name, None, None)
            response = self._lease(name, "release")
            if response.status_code not in (200, 404, 409):
                raise self._unexpected(response, f"releasing the lease of {name}")

    def describe(self) -> list[SlotView]:
        query = {
            "restype": "container",
            "comp": "list",
            "prefix": f"{self._group}/",
            "include": "metadata",
        }
        response = self.send("GET", "", query, {})
        if response.status_code != 200:
            raise self._unexpected(response, "listing the slots")
        if len(response.content) > MAX_LIST_BYTES:
            raise FleetError("fleet: the slot listing is too large", reason="bad_answer")
        try:
            # Our own authenticated account answers, capped at 1 MiB; expat resolves no entities.
            root = ElementTree.fromstring(response.content)  # noqa: S314
        except ElementTree.ParseError as error:
            raise FleetError(
                f"fleet: the slot listing is not XML: {error}", reason="bad_answer"
            ) from None
        found: dict[str, SlotView] = {}
        for blob in root.iter("Blob"):
            name = blob.findtext("Name") or ""
            held = blob.findtext("Properties/LeaseState") == "leased"
            metadata = {
                child.tag.lower(): child.text or "" for child in blob.iterfind("Metadata/*")
            }
            found[name] = SlotView(
                name,
                held,
                holder=metadata.get("holder") if held else None,
                event_id=metadata.get("event") if held else None,
                since=metadata.get("since") if held else None,
            )
        return [found.get(name, SlotView(name, False)) for name in self.slot_names()]

    def _create(self, name: str) -> None:
        headers = {"x-ms-blob-type": "BlockBlob", "If-None-Match": "*", "Content-Length": "0"}
        response = self.send("PUT", name, {}, headers)
        if response.status_code not in (201, 409, 412):  # 409/412: created by another agent
            raise self._unexpected(response, f"creating the slot {name}")

    def _lease(self, name: str, action: str) -> requests.Response:
        headers = {"x-ms-lease-action": action, "Content-Length": "0"}
        if action == "acquire":
            headers["x-ms-lease-duration"] = str(self.lease_seconds)
            headers["x-ms-proposed-lease-id"] = self.lease_id
        else:
            headers["x-ms-lease-id"] = self.lease_id
        return self.send("PUT", name, {"comp": "lease"}, headers)

    def _describe_holder(self, name: str, event_id: str | None, since: str | None) -> None:
        """Write (or, with None, clear) who holds the slot; a failure here costs only status."""
        headers = {"x-ms-lease-id": self.lease_id, "Content-Length": "0"}
        if event_id is not None and since is not None:
            headers.update(
                {
                    "x-ms-meta-holder": self._holder,
                    "x-ms-meta-event": event_id,
                    "x-ms-meta-since": since,
                }
            )
        self.send("PUT", name, {"comp": "metadata"}, headers)

    def send(
        self, method: str, blob: str, query: dict[str, str], extra: dict[str, str]
    ) -> requests.Response:
        url = f"{self._container}/{blob}" if blob else self._container
        if query:
            url += "?" + urlencode(query)
        headers = {"x-ms-version": STORAGE_VERSION, "x-ms-date": formatdate(usegmt=True), **extra}
        if self._sas is not None:
            url += ("&" if query else "?") + self._sas
        elif self._key is not None:
            headers["Authorization"] = shared_key_signature(
                method, url, headers, self._account, self._key
            )
        else:
            headers["Authorization"] = f"Bearer {self._bearer()}"
        try:
            response = self._session.request(
                method,
                url,
                headers=headers,
                data=b"" if method == "PUT" else None,
                timeout=self._timeout,
            )
        except requests.RequestException as error:
            raise FleetError(
                f"fleet: storage at {self._container} is unreachable ({type(error).__name__}): "
                "check DNS, the firewall and the storage account's network rules",
                reason="unreachable",
            ) from None
        if response.status_code in (401, 403):
            if self._token is not None:
                self._token.forget()
            raise FleetError(
                f"fleet: storage refused us ({response.status_code} "
                f"{response.headers.get('x-ms-error-code', '')}): the VM's identity needs the role "
                f"{ROLE} on the container (or give a SAS token with read, add, create, write and "
                "list permissions, or the account key)",
                reason="auth",
            )
        if response.status_code >= 500:
            raise FleetError(
                f"fleet: storage answered {response.status_code} "
                f"{response.headers.get('x-ms-error-code', '')}",
                reason="server",
            )
        return response

    def _bearer(self) -> str:
        if self._token is None:
            raise FleetError("fleet: no credentials for storage", reason="no_token")
        try:
            return self._token.get()
        except ImdsRequestRejected as error:
            raise FleetError(
                f"fleet: this VM has no managed identity to reach storage with ({error}); assign "
                f"one and grant it {ROLE} on the container, or configure fleet.sas_token",
                reason="no_token",
            ) from None
        except ImdsError as error:
            raise FleetError(f"fleet: no token from IMDS: {error}", reason="no_token") from None

    def _unexpected(self, response: requests.Response, doing: str) -> FleetError:
        code = response.headers.get("x-ms-error-code", "")
        hint = ""
        if code == "ContainerNotFound":
            hint = f": create the container {self._container} first (see the README)"
        return FleetError(
            f"fleet: storage answered {response.status_code} {code} {doing}{hint}",
            reason="refused",
        )


# FleetLock -------------------------------------------------------------------------------------


class FleetLockSlots:
    """The FleetLock protocol: a counting semaphore kept by the server, locks owned by ``id``."""

    name = "fleetlock"
    slots: int | None = None  # the server keeps the count
    lease_seconds: int | None = None  # its locks are held until given back

    def __init__(
        self,
        url: str,
        group: str,
        *,
        holder: str,
        timeout_seconds: float = 5.0,
        stop: threading.Event | None = None,
    ) -> None:
        self._url = url.rstrip("/")
        self._group = group
        self._holder = holder
        self._timeout = timeout_seconds
        self._session = DeadlineSession(stop=stop)
        self._session.headers["User-Agent"] = "scheduled-events-agent"

    def close(self) -> None:
        self._session.close()

    def acquire(self, event_id: str, since: str) -> Attempt:
        status, refusal = self._post("pre-reboot")
        if status == 200:
            return Attempt(self._group)
        return Attempt(None, f"the FleetLock server said no: {refusal}")

    def renew(self, slot: str) -> bool:
        return True  # a FleetLock lock is held until it is given back

    def release(self, slot: str | None) -> None:
        status, refusal = self._post("steady-state")
        if status != 200:
            raise FleetError(
                f"fleet: the FleetLock server did not take the slot back: {refusal}",
                reason="refused",
            )

    def describe(self) -> list[SlotView] | None:
        return None  # the protocol has no way to ask who holds what

    def _post(self, operation: str) -> tuple[int, str]:
        url = f"{self._url}/v1/{operation}"
        body = {"client_params": {"group": self._group, "id": self._holder}}
        try:
            response = self._session.post(
                url, json=body, headers={"fleet-lock-protocol": "true"}, timeout=self._timeout
            )
        except requests.RequestException as error:
            raise FleetError(
                f"fleet: the FleetLock server {self._url} is unreachable ({type(error).__name__})",
                reason="unreachable",
            ) from None
        if response.status_code == 200:
            return 200, ""
        try:
            answer = json_value(response.content)
            refusal = f"{answer['kind']}: {answer['value']}"
        except (ValueError, KeyError, TypeError):
            refusal = ""
        if response.status_code >= 500 or not refusal:
            # A 5xx is the server failing, not an answer about the slot; so is an error
            # without the protocol's body.
            raise FleetError(
                f"fleet: {url} answered {response.status_code} {refusal or '(no FleetLock error)'}",
                reason="server" if response.status_code >= 500 else "bad_answer",
            )
        return response.status_code, refusal


def build_backend(
    config: FleetConfig,
    holder: str,
    imds: ImdsClient | None,
    env: Mapping[str, str],
    *,
    clock: Clock,
    stop: threading.Event | None = None,
) -> Backend:
    """The configured coordinator; credentials from the configuration, else the environment,
    else the VM's managed identity."""
    assert config.url is not None
    if config.backend == "fleetlock":
        return FleetLockSlots(config.url, config.group, holder=holder, stop=stop)
    sas = config.sas_token or env.get(SAS_ENVIRONMENT) or None
    key = config.account_key or env.get(KEY_ENVIRONMENT) or None
    token = None
    if sas is None and key is None:
        if imds is None:
            raise AgentError("fleet: no SAS token or account key, and no IMDS for a token")
        token = TokenCache(imds, STORAGE_RESOURCE, clock=clock, budget_seconds=5)
    return BlobSlots(
        config.url,
        config.group,
        slots=config.slots,
        lease_seconds=config.lease_seconds,
        holder=holder,
        sas_token=sas,
        account_key=key,
        token=token,
        stop=stop,
    )


def gate_for(
    config: FleetConfig,
    *,
    holder: str,
    imds: ImdsClient | None,
    store: Store,
    metrics: Metrics,
    clock: Clock,
    stop: threading.Event,
    log: Any,
    env: Mapping[str, str],
) -> FleetGate:
    """The gate over the configured coordinator, on ``clock``."""
    return FleetGate(
        build_backend(config, holder, imds, env, clock=clock, stop=stop),
        config=config,
        store=store,
        metrics=metrics,
        clock=clock,
        stop=stop,
        log=log,
    )


# The gate --------------------------------------------------------------------------------------


class FleetGate:
    """This agent's side of the group: which of its events need the slot, and whether it has it."""

    def __init__(
        self,
        backend: Backend,
        *,
        config: FleetConfig,
        store: Store,
        metrics: Metrics,
        clock: Clock,
        stop: threading.Event,
        log: Any,
    ) -> None:
        self._backend = backend
        self._config = config
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._stop = stop
        self._log = log.bind(fleet_group=config.group, fleet_backend=backend.name)
        self._lock = threading.RLock()
        self._slot: str | None = None
        self._since: str | None = None
        self._renewed_at = float("-inf")
        self._holding: dict[str, str] = {}  # event key -> event id
        self._waiting: dict[str, float] = {}  # event key -> when it began to wait (monotonic)
        self._told_waiting: set[str] = set()
        self._release_pending = False
        self._problem: str | None = None
        self._problem_reason: str | None = None
        self._refusal: str | None = None

    @property
    def retry_seconds(self) -> float:
        return self._config.retry_seconds

    def held(self) -> bool:
        with self._lock:
            return self._slot is not None and self._fresh()

    def holds(self, key: str) -> bool:
        """True when ``key`` already holds this agent's slot."""
        key = key.lower()  # event keys, as the state store writes them
        with self._lock:
            return key in self._holding and self._slot is not None

    def waiting(self, key: str) -> bool:
        key = key.lower()  # event keys, as the state store writes them
        with self._lock:
            return key in self._waiting

    def hold(self, key: str, event_id: str) -> bool:
        """True when this agent holds a slot for ``key`` (taking one if it can); never waits."""
        key = key.lower()  # event keys, as the state store writes them
        with self._lock:
            started = self._waiting.setdefault(key, self._clock.monotonic())
            if self._slot is not None and not self._fresh():
                self._renew()
            if self._slot is None:
                since = self._clock.now().isoformat(timespec="seconds")
                attempt = self._call(lambda: self._backend.acquire(event_id, since))
                if attempt is None or attempt.slot is None:
                    self._tell_waiting(key, event_id, attempt)
                    return False
                self._slot, self._since = attempt.slot, since
                self._release_pending = False  # whatever was left from before, this is ours
                self._renewed_at = self._clock.monotonic()
                self._metrics.fleet_slot_held.set(1)
                self._log.info("fleet.slot_taken", slot=attempt.slot, event_id=event_id)
            elif not self._fresh():
                return False  # held, but not renewed in time: not for new approvals
            waited = self._clock.monotonic() - started
            if key not in self._holding:
                self._metrics.fleet_slot_wait.observe(waited)
                self._holding[key] = event_id
                self._log.info(
                    "fleet.slot_held_for",
                    slot=self._slot,
                    event_id=event_id,
                    waited_seconds=round(waited, 1),
                )
            self._waiting.pop(key, None)
            self._told_waiting.discard(key)
            self._record()
            return True

    def stop_waiting(self, key: str, *, missed: bool) -> None:
        """``key`` no longer waits for a slot (it started, NotBefore passed, or it left)."""
        key = key.lower()  # event keys, as the state store writes them
        with self._lock:
            started = self._waiting.pop(key, None)
            self._told_waiting.discard(key)
            if started is None:
                return
            waited = self._clock.monotonic() - started
            self._metrics.fleet_slot_wait.observe(waited)
            if missed:
                self._metrics.fleet_slot_missed.inc()
                self._log.warning(
                    "fleet.slot_missed",
                    event_id=key,
                    waited_seconds=round(waited, 1),
                    consequence="no early approval: Azure acts at NotBefore",
                )

    def release(self, key: str) -> None:
        """``key`` is over (and recovered): give the slot back once no event holds it."""
        key = key.lower()  # event keys, as the state store writes them
        with self._lock:
            self.stop_waiting(key, missed=False)
            if self._holding.pop(key, None) is None or self._holding or self._slot is None:
                return
            slot, self._slot, self._since = self._slot, None, None
            self._metrics.fleet_slot_held.set(0)
            self._log.info("fleet.slot_released", slot=slot, event_id=key)
            self._release_pending = True
            self._give_back(slot)
            self._record()

    def resume(self, needed: Mapping[str, str]) -> None:
        """At start-up: keep (take again) a slot for events that were approved before the
        restart and are not over; else give back whatever this agent may still hold."""
        with self._lock:
            for key, event_id in needed.items():
                self.hold(key, event_id)
                self._waiting.pop(key, None)
            if not needed and self._slot is None:  # (a slot taken already is this run's own)
                self._release_pending = True
                self._give_back(None)
            self._record()

    def tick(self) -> None:
        """Renew a held lease when due, and retry a release that failed."""
        with self._lock:
            lease = self._backend.lease_seconds
            if (
                self._slot is not None
                and lease is not None
                and self._clock.monotonic() - self._renewed_at >= lease / 3
            ):
                self._renew()
            if self._release_pending and self._slot is None:
                self._give_back(None)

    def close(self) -> None:
        self._backend.close()

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "backend": self._backend.name,
                "group": self._config.group,
                "slots": self._backend.slots,
                "slot": self._slot,
                "since": self._since,
                "events": sorted(self._holding.values()),
                "waiting": sorted(self._waiting),
                "problem": self._problem,
            }

    # Inside the lock ----------------------------------------------------------------------------

    def _fresh(self) -> bool:
        lease = self._backend.lease_seconds
        return lease is None or self._clock.monotonic() - self._renewed_at < lease - 2

    def _renew(self) -> None:
        slot = self._slot
        if slot is None:
            return
        started = self._clock.monotonic()
        renewed = self._call(lambda: self._backend.renew(slot))
        if renewed:
            self._renewed_at = started
        elif renewed is not None:
            self._metrics.fleet_errors.labels(backend=self._backend.name, reason="lost").inc()
            self._log.error(
                "fleet.slot_lost",
                slot=slot,
                events=sorted(self._holding.values()),
                reason="the lease could not be renewed: another agent holds the slot now",
            )
            self._slot = None
            self._metrics.fleet_slot_held.set(0)
            self._record()

    def _give_back(self, slot: str | None) -> None:
        def give_back() -> bool:
            self._backend.release(slot)
            return True

        if self._call(give_back):
            self._release_pending = False

    def _call(self, action: Callable[[], _T]) -> _T | None:
        """Run one coordinator call; None when it failed (logged once per change, counted)."""
        try:
            result = action()
        except FleetError as error:
            self._metrics.fleet_errors.labels(backend=self._backend.name, reason=error.reason).inc()
            # Once per change of cause: the wording differs between calls, the cause does not.
            if error.reason != self._problem_reason:
                self._problem_reason = error.reason
                self._problem = str(error)
                self._log.error(
                    "fleet.unavailable",
                    reason=str(error),
                    consequence="no early approval until the coordinator answers; "
                    "hooks still run and Azure acts at NotBefore",
                )
                self._record()
            return None
        if self._problem is not None:
            self._log.info("fleet.available", after=self._problem)
            self._problem = self._problem_reason = None
            self._record()
        return result

    def _tell_waiting(self, key: str, event_id: str, attempt: Attempt | None) -> None:
        detail = attempt.detail if attempt is not None else self._problem or ""
        if key not in self._told_waiting or (attempt is not None and detail != self._refusal):
            self._told_waiting.add(key)
            self._refusal = detail
            self._log.info(
                "fleet.waiting_for_slot",
                event_id=event_id,
                detail=detail,
                consequence="no early approval until a slot is free",
            )

    def _record(self) -> None:
        self._store.set_meta(
            fleet=json.dumps(
                {**self.describe(), "recorded_at": self._clock.now().isoformat(timespec="seconds")}
            )
        )
