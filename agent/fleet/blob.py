"""The ``blob`` backend: the slots of a group are blobs in an Azure Storage container, and
holding a slot is holding that blob's lease."""

from __future__ import annotations

import base64
import threading
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import formatdate, parsedate_to_datetime
from urllib.parse import quote, unquote, urlencode
from xml.etree import ElementTree

import requests

from agent.config import account_name
from agent.errors import ImdsError, ImdsRequestRejected
from agent.fleet.backend import Attempt, FleetError, Holding, SlotView, WaiterView
from agent.fleet.sharedkey import shared_key_signature
from agent.http import DeadlineSession
from agent.imds import TokenCache

STORAGE_RESOURCE = "https://storage.azure.com/"
STORAGE_VERSION = "2021-08-06"
ROLE = "Storage Blob Data Contributor"
SAS_ENVIRONMENT = "SCHEDULED_EVENTS_AGENT_FLEET_SAS_TOKEN"
KEY_ENVIRONMENT = "SCHEDULED_EVENTS_AGENT_FLEET_ACCOUNT_KEY"
MAX_LIST_BYTES = 1024 * 1024
# A slot's marker is honoured for at most this long, whatever it says (a week).
MAX_DOWN_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class Marker:
    """A slot's holder through its maintenance, as its metadata says, in storage's own time
    (the blob's Last-Modified and the answer's Date): no VM's clock is trusted."""

    holder: str
    events: str
    down_seconds: int
    written: datetime
    now: datetime

    @classmethod
    def read(cls, metadata: dict[str, str], last_modified: str, now: datetime) -> Marker | None:
        holder = metadata.get("holder", "")
        text = metadata.get("down_seconds", "0")
        if not holder or not (text.isascii() and text.isdigit()) or len(text) > 9:
            return None
        seconds = min(int(text), MAX_DOWN_SECONDS)
        written = _http_time(last_modified)
        if seconds == 0 or written is None:
            return None
        return cls(holder, metadata.get("event", ""), seconds, written, now)

    @property
    def until(self) -> datetime:
        return self.written + timedelta(seconds=self.down_seconds)

    @property
    def live(self) -> bool:
        return self.now < self.until

    def until_text(self) -> str:
        return self.until.strftime("%Y-%m-%dT%H:%M:%SZ")

    def describe(self) -> str:
        state = "held" if self.live else "was held"
        return (
            f"{self.holder} {state} it through its maintenance ({self.events}) "
            f"until {self.until_text()}"
        )


def _http_time(text: str) -> datetime | None:
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _server_time(response: requests.Response) -> datetime:
    """Storage's clock, from the answer's Date; this machine's if it has none."""
    return _http_time(response.headers.get("Date", "")) or datetime.now(timezone.utc)


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
        heartbeat_seconds: float = 5.0,
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
        # A waiter whose heartbeat is older than this has gone: it loses its place in line.
        self._stale_seconds = max(15.0, 3 * heartbeat_seconds)
        self._queued = False  # our waiter blob exists (we are in line)
        # The same id after a restart: what this agent held before can be given back.
        self.lease_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self._container}/{group}/{holder}"))
        # Storage is reached directly, as configured; each call within its whole timeout.
        self._session = DeadlineSession(stop=stop)
        self._session.headers["User-Agent"] = "scheduled-events-agent"

    def close(self) -> None:
        self._session.close()

    def slot_names(self) -> list[str]:
        return [f"{self._group}/slot-{index}" for index in range(self.slots or 0)]

    def acquire(self, holding: Holding, *, not_before: str | None = None) -> Attempt:
        """A slot, when it is our turn: agents wait in line by the earliest NotBefore of their
        events (then by how long they have waited), each with a heartbeat on a small blob."""
        not_our_turn = self._turn(not_before)
        if not_our_turn is not None:
            return Attempt(None, not_our_turn)
        names = self.slot_names()
        # Start at a slot of our own, so that agents do not all queue on slot 0.
        first = zlib.crc32(self._holder.encode("utf-8")) % len(names)
        held_down: list[str] = []
        for name in names[first:] + names[:first]:
            response = self._lease(name, "acquire")
            if response.status_code == 404:
                self._create(name)
                response = self._lease(name, "acquire")
            if response.status_code == 409:
                continue  # leased by another agent
            if response.status_code not in (200, 201):
                raise self._unexpected(response, f"taking the lease of {name}")
            # The lease is ours, so nobody can change the marker while we read it.
            marker = self._marker(name)
            if marker is not None and marker.holder != self._holder and marker.live:
                self._lease(name, "release")
                held_down.append(marker.describe())
                continue
            try:
                self._write_holding(name, holding)
            except FleetError:
                # No marker, no slot: give the lease back at once rather than sit on it unused.
                self._lease(name, "release")
                raise
            self.leave_queue()
            expired = marker.describe() if marker and marker.holder != self._holder else None
            return Attempt(name, took_over=expired)
        detail = f"all {len(names)} slot(s) of group {self._group} are held"
        if held_down:
            detail += f" ({'; '.join(held_down)})"
        return Attempt(None, detail)

    def renew(self, slot: str, holding: Holding) -> bool:
        response = self._lease(slot, "renew")
        if response.status_code in (404, 409):
            return False  # leased by another since, or deleted
        if response.status_code != 200:
            raise self._unexpected(response, f"renewing the lease of {slot}")
        # The marker again: its time is the holder's last sign of life.
        self._write_holding(slot, holding)
        return True

    def release(self, slot: str | None) -> None:
        """Give back ``slot``, or (None) every slot this agent may still hold: leased with its
        lease id, or marked as held by it through a maintenance (the lease may have lapsed)."""
        names = [slot] if slot is not None else self._mine()
        for name in names:
            if self._metadata(name, None).status_code != 200:
                # Not leased with our id (it lapsed while this VM was down): take the lease
                # again to clear our marker, unless another agent holds it now.
                taken = self._lease(name, "acquire")
                if taken.status_code in (404, 409):
                    continue
                if taken.status_code not in (200, 201):
                    raise self._unexpected(taken, f"taking back the lease of {name}")
                # Cleared only if it is still ours: another agent may have held the slot since
                # our lease lapsed, and be down for its own maintenance now.
                if self._holder_of(name) in (self._holder, None):
                    self._write_holding(name, None)
            response = self._lease(name, "release")
            if response.status_code not in (200, 404, 409):
                raise self._unexpected(response, f"releasing the lease of {name}")

    def _mine(self) -> list[str]:
        """The slots that name this agent as their holder (leased or not)."""
        return [view.name for view in self.describe() if view.holder == self._holder]

    def describe(self) -> list[SlotView]:
        return self._listing()[0]

    def queue(self) -> list[WaiterView]:
        """The agents waiting for a slot, first in line first (stale ones included, marked)."""
        return self._listing()[1]

    def leave_queue(self) -> None:
        if not self._queued:
            return
        response = self.send("DELETE", self._waiter_name(), {}, {})
        if response.status_code not in (202, 404):
            raise self._unexpected(response, "leaving the queue")
        self._queued = False

    def _turn(self, not_before: str | None) -> str | None:
        """Say that we wait (a heartbeat on our waiter blob); None when it is our turn, else
        why not: fewer slots are free than agents whose turn comes first."""
        self._heartbeat(not_before)
        slots, waiters = self._listing()
        holding = {slot.holder for slot in slots if slot.held}
        if self._holder in holding:
            return None  # ours already (back after a restart): take it up again
        free = sum(1 for slot in slots if not slot.held)
        ahead = []
        for waiter in waiters:
            if waiter.holder == self._holder:
                break
            if waiter.fresh and waiter.holder not in holding:
                ahead.append(waiter)
        if free == 0:
            detail = f"all {len(slots)} slot(s) of group {self._group} are held"
            down = [
                f"{slot.holder} held it through its maintenance ({slot.event_id}) "
                f"until {slot.down_until}"
                for slot in slots
                if slot.down_until is not None
            ]
            return detail + (f" ({'; '.join(down)})" if down else "")
        if len(ahead) < free:
            return None
        first = ", ".join(f"{w.holder} (NotBefore {w.not_before or 'none'})" for w in ahead[:3])
        return (
            f"{len(ahead)} agent(s) ahead in line for {free} free slot(s) of group "
            f"{self._group}: {first}"
        )

    def _heartbeat(self, not_before: str | None) -> None:
        name = self._waiter_name()
        headers = {"Content-Length": "0", "x-ms-meta-not_before": not_before or ""}
        if not self._queued:
            # A new wait: a new blob, whose creation time is our place in the line.
            self.send("DELETE", name, {}, {})
            created = self.send("PUT", name, {}, {**headers, "x-ms-blob-type": "BlockBlob"})
            if created.status_code != 201:
                raise self._unexpected(created, "joining the queue")
            self._queued = True
            return
        response = self.send("PUT", name, {"comp": "metadata"}, headers)
        if response.status_code == 404:  # deleted under us (an operator): join again
            self._queued = False
            self._heartbeat(not_before)
        elif response.status_code != 200:
            raise self._unexpected(response, "renewing our place in the queue")

    def _waiter_name(self) -> str:
        return f"{self._group}/waiting/{quote(self._holder, safe='')}"

    def _listing(self) -> tuple[list[SlotView], list[WaiterView]]:
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
        now = _server_time(response)
        found: dict[str, SlotView] = {}
        waiters: list[tuple[tuple[str, str, str], WaiterView]] = []
        waiting = f"{self._group}/waiting/"
        for blob in root.iter("Blob"):
            name = blob.findtext("Name") or ""
            metadata = {
                child.tag.lower(): child.text or "" for child in blob.iterfind("Metadata/*")
            }
            modified = blob.findtext("Properties/Last-Modified") or ""
            if name.startswith(waiting):
                created = _http_time(blob.findtext("Properties/Creation-Time") or modified)
                heartbeat = _http_time(modified)
                if created is None or heartbeat is None:
                    continue
                not_before = metadata.get("not_before") or None
                view = WaiterView(
                    unquote(name[len(waiting) :]),
                    not_before,
                    created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    fresh=(now - heartbeat).total_seconds() <= self._stale_seconds,
                )
                waiters.append(((not_before or "~", view.waiting_since, view.holder), view))
                continue
            leased = blob.findtext("Properties/LeaseState") == "leased"
            marker = Marker.read(metadata, modified, now)
            down = marker is not None and marker.live
            held = leased or down
            found[name] = SlotView(
                name,
                held,
                holder=metadata.get("holder") if held or marker else None,
                event_id=metadata.get("event") if held else None,
                since=metadata.get("since") if held else None,
                down_until=marker.until_text() if marker is not None and down else None,
            )
        slots = [found.get(name, SlotView(name, False)) for name in self.slot_names()]
        return slots, [view for _, view in sorted(waiters, key=lambda pair: pair[0])]

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

    def _write_holding(self, name: str, holding: Holding | None) -> None:
        """Write (or, with None, clear) who holds the slot and for what, under our lease.

        Not a nicety: the marker is what keeps the slot through this VM's maintenance, so a
        failure to write it fails the call (the gate then does not approve)."""
        response = self._metadata(name, holding)
        if response.status_code != 200:
            raise self._unexpected(response, f"writing the holder of {name}")

    def _metadata(self, name: str, holding: Holding | None) -> requests.Response:
        headers = {"x-ms-lease-id": self.lease_id, "Content-Length": "0"}
        if holding is not None:
            headers.update(
                {
                    "x-ms-meta-holder": self._holder,
                    "x-ms-meta-event": ",".join(holding.events),
                    "x-ms-meta-since": holding.since,
                    "x-ms-meta-down_seconds": str(holding.down_seconds),
                }
            )
        return self.send("PUT", name, {"comp": "metadata"}, headers)

    def _marker(self, name: str) -> Marker | None:
        metadata, response = self._properties(name)
        return Marker.read(
            metadata, response.headers.get("Last-Modified", ""), _server_time(response)
        )

    def _holder_of(self, name: str) -> str | None:
        return self._properties(name)[0].get("holder") or None

    def _properties(self, name: str) -> tuple[dict[str, str], requests.Response]:
        response = self.send("HEAD", name, {}, {})
        if response.status_code != 200:
            raise self._unexpected(response, f"reading the holder of {name}")
        metadata = {
            key[len("x-ms-meta-") :].lower(): value
            for key, value in response.headers.items()
            if key.lower().startswith("x-ms-meta-")
        }
        return metadata, response

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
                f"{ROLE} on the container (or give a SAS token with read, add, create, write, "
                "delete and list permissions, or the account key)",
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
