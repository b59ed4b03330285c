"""The ``fleetlock`` backend: a FleetLock server (the protocol Zincati defines) keeps the
count, and its locks are held until given back."""

from __future__ import annotations

import threading

import requests

from agent.fleet.backend import Attempt, FleetError, Holding, SlotView, WaiterView
from agent.http import DeadlineSession, json_value


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

    def acquire(self, holding: Holding, *, not_before: str | None = None) -> Attempt:
        # The server decides who goes first: the protocol carries no deadline.
        status, refusal = self._post("pre-reboot")
        if status == 200:
            return Attempt(self._group)
        return Attempt(None, f"the FleetLock server said no: {refusal}")

    def renew(self, slot: str, holding: Holding) -> bool:
        # A FleetLock lock is held until it is given back, through the reboot too: the server,
        # not a marker, keeps it.
        return True

    def release(self, slot: str | None) -> None:
        status, refusal = self._post("steady-state")
        if status != 200:
            raise FleetError(
                f"fleet: the FleetLock server did not take the slot back: {refusal}",
                reason="refused",
            )

    def leave_queue(self) -> None:
        return  # no line of our own: the server keeps it

    def queue(self) -> list[WaiterView] | None:
        return None  # the protocol has no way to ask who waits

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
