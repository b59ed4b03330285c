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

from agent.fleet.backend import Attempt, Backend, FleetError, Holding, SlotView
from agent.fleet.blob import (
    KEY_ENVIRONMENT,
    ROLE,
    SAS_ENVIRONMENT,
    STORAGE_RESOURCE,
    STORAGE_VERSION,
    BlobSlots,
)
from agent.fleet.factory import build_backend, gate_for
from agent.fleet.fleetlock import FleetLockSlots
from agent.fleet.gate import TICK_SECONDS, FleetGate
from agent.fleet.sharedkey import shared_key_signature

__all__ = [
    "KEY_ENVIRONMENT",
    "ROLE",
    "SAS_ENVIRONMENT",
    "STORAGE_RESOURCE",
    "STORAGE_VERSION",
    "TICK_SECONDS",
    "Attempt",
    "Backend",
    "BlobSlots",
    "FleetError",
    "FleetGate",
    "FleetLockSlots",
    "Holding",
    "SlotView",
    "build_backend",
    "gate_for",
    "shared_key_signature",
]
