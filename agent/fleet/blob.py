"""The ``blob`` backend: the slots of a group are blobs in an Azure Storage container, and
holding a slot is holding that blob's lease."""

from __future__ import annotations

import base64
import threading
import uuid
import zlib
from email.utils import formatdate
from urllib.parse import urlencode
from xml.etree import ElementTree

import requests

from agent.config import account_name
from agent.errors import ImdsError, ImdsRequestRejected
from agent.fleet.backend import Attempt, FleetError, SlotView
from agent.fleet.sharedkey import shared_key_signature
from agent.http import DeadlineSession
from agent.imds import TokenCache

STORAGE_RESOURCE = "https://storage.azure.com/"
STORAGE_VERSION = "2021-08-06"
ROLE = "Storage Blob Data Contributor"
SAS_ENVIRONMENT = "SCHEDULED_EVENTS_AGENT_FLEET_SAS_TOKEN"
KEY_ENVIRONMENT = "SCHEDULED_EVENTS_AGENT_FLEET_ACCOUNT_KEY"
MAX_LIST_BYTES = 1024 * 1024


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
