"""The configured backend and the gate over it."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from agent.clock import Clock
from agent.config import FleetConfig
from agent.errors import AgentError
from agent.fleet.backend import Backend
from agent.fleet.blob import KEY_ENVIRONMENT, SAS_ENVIRONMENT, STORAGE_RESOURCE, BlobSlots
from agent.fleet.fleetlock import FleetLockSlots
from agent.fleet.gate import FleetGate
from agent.imds import ImdsClient, TokenCache
from agent.metrics import Metrics
from agent.state import Store


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
        heartbeat_seconds=config.retry_seconds,
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
