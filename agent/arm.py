"""Azure Resource Manager, for self-service maintenance: read the maintenance windows of this VM
and start its maintenance (docs/AZURE.md section 6).

Invariants:
- Authorised with the VM's managed identity: a token from IMDS for the management resource,
  cached until five minutes before it expires.
- Paths come from instance metadata's ``resourceId``, which is already the scale-set instance's
  own path for a scale-set VM.
- Every failure is an ArmError whose message names the cause and the fix: no identity, the
  missing permission, throttling (``retry_after`` from Retry-After), ARM unreachable, not allowed.
- Never a proxy from the environment for the token (IMDS); ARM itself is reached as configured.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import requests

from agent.clock import Clock
from agent.errors import AgentError, ImdsError, ImdsRequestRejected
from agent.events import parse_iso8601
from agent.http import DeadlineSession, json_value, retry_after_seconds
from agent.imds import ImdsClient, TokenCache

ARM_RESOURCE = "https://management.azure.com/"
ARM_API_VERSION = "2025-04-01"
PERMISSION = "Microsoft.Compute/virtualMachines/performMaintenance/action"
# A throttled check waits what Retry-After says, within an hour; a minute when it says nothing
# readable.
RETRY_AFTER_MAX_SECONDS = 3600.0
THROTTLED_DEFAULT_SECONDS = 60.0


def parse_arm_time(text: str) -> datetime:
    """Read a time of an ARM answer, in whichever ISO 8601 form it comes (ARM writes more than
    one). The one parser for them: ValueError, naming the value, when it is not a time."""
    return parse_iso8601(text)


class ArmError(AgentError):
    """ARM refused or could not be reached; ``cause`` is a fixed word for metrics and logs."""

    def __init__(self, message: str, *, cause: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.retry_after = retry_after


@dataclass(frozen=True)
class MaintenanceStatus:
    """``maintenanceRedeployStatus``; the windows are ISO 8601 strings, as ARM gives them, each
    known to read with ``parse_arm_time`` (an answer with one that does not is refused)."""

    allowed: bool
    self_service_start: str | None
    self_service_end: str | None
    scheduled_start: str | None
    scheduled_end: str | None
    last_result: str | None
    last_message: str | None

    @classmethod
    def from_view(cls, view: Any) -> MaintenanceStatus | None:
        status = view.get("maintenanceRedeployStatus") if isinstance(view, dict) else None
        if not isinstance(status, dict):
            return None

        def text(key: str) -> str | None:
            value = status.get(key)
            return value if isinstance(value, str) and value else None

        def moment(key: str) -> str | None:
            """A window's time, as ARM wrote it, once it is known to read as one."""
            value = status.get(key)
            if value is None or value == "":
                return None
            try:
                if not isinstance(value, str):
                    raise ValueError(f"{value!r} is not a string")
                parse_arm_time(value)
            except ValueError as error:
                raise ArmError(
                    f"arm: maintenanceRedeployStatus.{key} cannot be read as a time: {error}",
                    cause="bad_answer",
                ) from None
            return value

        return cls(
            allowed=status.get("isCustomerInitiatedMaintenanceAllowed") is True,
            self_service_start=moment("preMaintenanceWindowStartTime"),
            self_service_end=moment("preMaintenanceWindowEndTime"),
            scheduled_start=moment("maintenanceWindowStartTime"),
            scheduled_end=moment("maintenanceWindowEndTime"),
            last_result=text("lastOperationResultCode"),
            last_message=text("lastOperationMessage"),
        )


class ArmClient:
    def __init__(
        self,
        base_url: str,
        imds: ImdsClient,
        *,
        clock: Clock,
        api_version: str = ARM_API_VERSION,
        timeout_seconds: float = 30.0,
        stop: threading.Event | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._api_version = api_version
        self._timeout = timeout_seconds
        # Each call within its whole timeout. A proxy from the environment is used: the way
        # to management.azure.com may need one (IMDS, for the token, never does).
        self._session = DeadlineSession(stop=stop, trust_env=True)
        self._session.headers["User-Agent"] = "scheduled-events-agent"
        self._token = TokenCache(imds, ARM_RESOURCE, clock=clock)

    def close(self) -> None:
        self._session.close()

    def instance_view(self, resource_id: str) -> MaintenanceStatus | None:
        """The maintenance windows, or None when no maintenance is planned for this VM."""
        view = self._request("GET", f"{resource_id}/instanceView")
        return MaintenanceStatus.from_view(view)

    def perform_maintenance(self, resource_id: str) -> str | None:
        """Start the maintenance; the operation URL to poll, or None if it finished at once."""
        response = self._send(
            "POST", f"{self._base_url}{resource_id}/performMaintenance", versioned=True
        )
        if response.status_code == 200:
            return None
        location = response.headers.get("Azure-AsyncOperation") or response.headers.get("Location")
        if not location:
            raise ArmError(
                "arm: performMaintenance answered 202 without an operation to follow",
                cause="bad_answer",
            )
        return location

    def operation_status(self, url: str) -> str:
        """``InProgress``, ``Succeeded``, ``Failed`` or ``Canceled``."""
        # The URL comes from ARM's answer; the VM's token goes only to ARM's own address.
        here, there = urlsplit(self._base_url), urlsplit(url)
        if (there.scheme, there.netloc) != (here.scheme, here.netloc):
            raise ArmError(
                f"arm: the operation to follow is at {there.scheme}://{there.netloc}, not at "
                f"{self._base_url}: not followed (the VM's token goes only to ARM)",
                cause="bad_answer",
            )
        body = self._json(self._send("GET", url, versioned=False), url)
        status = body.get("status") if isinstance(body, dict) else None
        if not isinstance(status, str):
            raise ArmError(f"arm: the operation {url} has no status", cause="bad_answer")
        return status

    def _request(self, method: str, path: str) -> Any:
        url = f"{self._base_url}{path}"
        return self._json(self._send(method, url, versioned=True), url)

    def _json(self, response: requests.Response, url: str) -> Any:
        try:
            return json_value(response.content)
        except ValueError:
            raise ArmError(f"arm: the answer of {url} is not JSON", cause="bad_answer") from None

    def _send(self, method: str, url: str, *, versioned: bool) -> requests.Response:
        params = {"api-version": self._api_version} if versioned else None
        headers = {"Authorization": f"Bearer {self._bearer()}"}
        try:
            response = self._session.request(
                method, url, params=params, headers=headers, timeout=self._timeout
            )
        except requests.RequestException as error:
            raise ArmError(
                f"arm: {self._base_url} is unreachable ({type(error).__name__}): check DNS, "
                "the firewall and any proxy on the way to management.azure.com (arm.url)",
                cause="unreachable",
            ) from None
        if response.status_code in (200, 201, 202):
            return response
        if response.status_code == 401:
            self._token.forget()  # a revoked or expired token: fetch a new one next time
        raise _error_for(response, method, url)

    def _bearer(self) -> str:
        try:
            return self._token.get()
        except ImdsRequestRejected as error:
            raise ArmError(
                "arm: this VM has no managed identity to read its maintenance windows with "
                f"({error}); assign one: az vm identity assign -g GROUP -n VM",
                cause="no_identity",
            ) from None
        except ImdsError as error:
            raise ArmError(f"arm: no token from IMDS: {error}", cause="no_token") from None


def _error_for(response: requests.Response, method: str, url: str) -> ArmError:
    try:
        error = json_value(response.content).get("error", {})
        code, message = str(error.get("code", "")), str(error.get("message", ""))
    except (ValueError, AttributeError):
        code, message = "", response.text[:200]
    status = response.status_code
    where = f"arm: {method} {url.split('?', maxsplit=1)[0]} answered {status} {code}"
    if status == 403:
        return ArmError(
            f"{where}: the VM's identity lacks a permission: it needs "
            "Microsoft.Compute/virtualMachines/read to see the windows and "
            f"{PERMISSION} to start the maintenance (a role with them on the VM: "
            "Virtual Machine Contributor, or a custom role)",
            cause="forbidden",
        )
    if status == 409:
        return ArmError(
            f"{where}: {message} (self-service maintenance is not allowed now)", cause="not_allowed"
        )
    if status == 429:
        retry = retry_after_seconds(
            response.headers.get("Retry-After", ""), at_most=RETRY_AFTER_MAX_SECONDS
        )
        seconds = THROTTLED_DEFAULT_SECONDS if retry is None else retry
        return ArmError(
            f"{where}: throttled, retrying in {seconds:g} s", cause="throttled", retry_after=seconds
        )
    if status == 401:
        return ArmError(
            f"{where}: the token was refused; a new one is fetched next time", cause="unauthorized"
        )
    return ArmError(f"{where}: {message}", cause=f"http_{status}")
