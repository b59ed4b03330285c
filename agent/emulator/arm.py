"""The emulated Azure Resource Manager side of self-service maintenance (docs/AZURE.md section 6).

Serves, for the emulated VM's resourceId: ``GET {resourceId}/instanceView`` with a configurable
``maintenanceRedeployStatus``, ``POST {resourceId}/performMaintenance`` answered 202 with an
operation to poll (``Location``, ``Azure-AsyncOperation``, ``Retry-After``) that ends Succeeded or
Failed, and errors on demand (401, 403, 409 not allowed, 429 with Retry-After). A maintenance
that succeeds is followed by a Redeploy event for the VM, as on Azure.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from agent.emulator.world import World

ARM_VERSIONS = ("2024-03-01", "2024-07-01", "2024-11-01", "2025-04-01")


@dataclass
class ArmState:
    """What the control API sets: the windows, the identity, the outcome, queued errors."""

    status: dict[str, Any] | None = None
    identity: bool = True
    operation_outcome: str = "Succeeded"
    operation_polls: int = 1  # how many polls answer InProgress before the outcome
    errors: list[dict[str, Any]] = field(default_factory=list)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    performed: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def configure(self, body: dict[str, Any]) -> None:
        unknown = set(body) - {
            "status",
            "identity",
            "operation_outcome",
            "operation_polls",
            "error",
        }
        if unknown:
            raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
        with self.lock:
            if "status" in body:
                status = body["status"]
                if status is not None and not isinstance(status, dict):
                    raise ValueError("status: expected an object or null")
                self.status = status
            if "identity" in body:
                self.identity = bool(body["identity"])
            if "operation_outcome" in body:
                if body["operation_outcome"] not in ("Succeeded", "Failed", "Canceled"):
                    raise ValueError("operation_outcome: Succeeded, Failed or Canceled")
                self.operation_outcome = body["operation_outcome"]
            if "operation_polls" in body:
                self.operation_polls = int(body["operation_polls"])
            if "error" in body:
                error = body["error"]
                if not isinstance(error, dict) or error.get("status") not in (
                    401,
                    403,
                    409,
                    429,
                    500,
                ):
                    raise ValueError("error: {status: 401|403|409|429|500, count, retry_after}")
                self.errors.append({"count": 1, **error})

    def take_error(self) -> dict[str, Any] | None:
        with self.lock:
            if not self.errors:
                return None
            error = self.errors[0]
            error["count"] -= 1
            if error["count"] <= 0:
                self.errors.pop(0)
            return dict(error)


def error_body(status: int, vm_name: str) -> dict[str, Any]:
    codes = {
        401: ("InvalidAuthenticationToken", "The access token is invalid."),
        403: (
            "AuthorizationFailed",
            "The client does not have authorization to perform action "
            "'Microsoft.Compute/virtualMachines/performMaintenance/action'.",
        ),
        409: (
            "OperationNotAllowed",
            f"Operation 'performMaintenance' is not allowed on VM "
            f"'{vm_name}' since the Subscription of this VM is not "
            "eligible.",
        ),
        429: ("TooManyRequests", "The request is being throttled."),
        500: ("InternalServerError", "An internal error occurred."),
    }
    code, message = codes[status]
    return {"error": {"code": code, "message": message}}


def perform(state: ArmState, world: World, base_url: str) -> tuple[int, dict[str, Any], str]:
    """Start a maintenance; (status, body, operation URL)."""
    with state.lock:
        allowed = bool((state.status or {}).get("isCustomerInitiatedMaintenanceAllowed"))
        if not allowed:
            return 409, error_body(409, world.vm_name), ""
        operation_id = str(uuid.uuid4())
        state.operations[operation_id] = {
            "polls_left": state.operation_polls,
            "outcome": state.operation_outcome,
        }
        state.performed.append(operation_id)
    return 202, {}, f"{base_url}/emulator-arm/operations/{operation_id}"


def poll(state: ArmState, world: World, operation_id: str) -> dict[str, Any] | None:
    with state.lock:
        operation = state.operations.get(operation_id)
        if operation is None:
            return None
        if operation["polls_left"] > 0:
            operation["polls_left"] -= 1
            return {"name": operation_id, "status": "InProgress"}
        outcome = operation["outcome"]
        if not operation.get("finished"):
            operation["finished"] = True
            status = dict(state.status or {})
            status["isCustomerInitiatedMaintenanceAllowed"] = False
            status["lastOperationResultCode"] = (
                "MaintenanceCompleted" if outcome == "Succeeded" else "MaintenanceAborted"
            )
            state.status = status
            if outcome == "Succeeded":
                # The host is being updated: the VM is told through Scheduled Events.
                world.add(
                    {
                        "type": "Redeploy",
                        "not_before_in_seconds": 60,
                        "started_for_seconds": 1,
                        "description": "Maintenance requested by the owner.",
                    }
                )
    body: dict[str, Any] = {"name": operation_id, "status": outcome}
    if outcome != "Succeeded":
        body["error"] = {"code": "MaintenanceFailed", "message": "The maintenance failed."}
    return body
