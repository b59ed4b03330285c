"""The Instance Metadata Service client: read Scheduled Events, approve them, read the instance.

Invariants (docs/AZURE.md section 1):
- Every request carries ``Metadata: true``; proxies are never used, whatever the environment
  says (``trust_env`` is off and no proxies are ever passed).
- One ``requests.Session``, so one kept-alive connection serves every poll. Requests are
  serialised by a lock: the daemon's poller and its approvers may call from different threads.
- The first Scheduled Events request may take two minutes (it turns the service on), so it alone
  gets the long read timeout; once one has succeeded, requests get short ones.
- 404, 410, 429, 5xx, timeouts and resets are retried with exponential backoff and jitter
  (``Retry-After`` honoured), within a time budget, and no longer once the stop flag is set.
  Any other 4xx is raised at once. Callers only ever see errors from ``agent.errors``.
- ``If-None-Match`` is sent with the last ETag, and a 304 or a byte-identical body returns the
  previous parsed document; neither is relied on for correctness.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, TypeVar
from urllib.parse import urlencode

import requests
import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_any,
    stop_when_event_set,
)
from tenacity.stop import stop_base

from agent.clock import Clock
from agent.errors import (
    ApprovalWithdrawn,
    DocumentError,
    ImdsError,
    ImdsRequestRejected,
    ImdsResponseInvalid,
    ImdsUnavailable,
    OperationCancelled,
)
from agent.events import ScheduledEventsDocument, parse_document_bytes
from agent.http import (
    AnswerTooLarge,
    DeadlineExceeded,
    DeadlineSession,
    json_value,
    retry_after_seconds,
)
from agent.mirror import DocumentCopy

DEFAULT_URL = "http://169.254.169.254"
DEFAULT_API_VERSION = "2020-07-01"
INSTANCE_API_VERSION = "2021-02-01"
SCHEDULED_EVENTS_PATH = "/metadata/scheduledevents"
IDENTITY_PATH = "/metadata/identity/oauth2/token"
IDENTITY_API_VERSION = "2018-02-01"
INSTANCE_PATH = "/metadata/instance"
# A real document is a few hundred bytes an event; a thousand events fit in well under 1 MiB.
MAX_BODY_BYTES = 4 * 1024 * 1024

_TRANSIENT_STATUSES = frozenset({404, 410, 429})
_T = TypeVar("_T")


@dataclass(frozen=True)
class Timeouts:
    """Socket timeouts in seconds. ``first_read`` covers the service's two-minute cold start."""

    connect: float = 2.0
    read: float = 5.0
    first_read: float = 125.0


@dataclass(frozen=True)
class RetryPolicy:
    """How long transient failures are retried, and how the waits between attempts grow."""

    budget_seconds: float = 30.0
    initial_wait_seconds: float = 0.2
    max_wait_seconds: float = 5.0


@dataclass(frozen=True)
class InstanceMetadata:
    """The ``compute`` facts the agent uses. Every value is a string (``""`` when unset)."""

    name: str
    vm_id: str
    subscription_id: str
    resource_group_name: str
    vm_scale_set_name: str
    platform_update_domain: str
    platform_fault_domain: str
    location: str
    zone: str
    resource_id: str

    @classmethod
    def from_json(cls, data: object, url: str) -> InstanceMetadata:
        compute = data.get("compute") if isinstance(data, dict) else None
        if not isinstance(compute, dict):
            raise ImdsResponseInvalid(f"imds: no 'compute' object in the answer of {url}", url=url)
        name = compute.get("name")
        if not isinstance(name, str) or name == "":
            raise ImdsResponseInvalid(
                f"imds: compute.name is missing or empty in the answer of {url} "
                "(set vm_name in the configuration)",
                url=url,
            )

        def text(key: str) -> str:
            value = compute.get(key, "")
            return value if isinstance(value, str) else str(value)

        return cls(
            name=name,
            vm_id=text("vmId"),
            subscription_id=text("subscriptionId"),
            resource_group_name=text("resourceGroupName"),
            vm_scale_set_name=text("vmScaleSetName"),
            platform_update_domain=text("platformUpdateDomain"),
            platform_fault_domain=text("platformFaultDomain"),
            location=text("location"),
            zone=text("zone"),
            resource_id=text("resourceId"),
        )


class _TransientFailure(Exception):
    """One attempt failed in a way worth retrying. Internal: never leaves this module."""

    def __init__(self, description: str, status: int | None, retry_after: float | None) -> None:
        super().__init__(description)
        self.description = description
        self.status = status
        self.retry_after = retry_after


class _StopBeforeBudget(stop_base):
    """tenacity's stop_before_delay on our clock: stop before a wait that would end past the
    budget, counted from when this policy was made (one per call)."""

    def __init__(self, clock: Clock, budget_seconds: float) -> None:
        self._clock = clock
        self._budget = budget_seconds
        self._started = clock.monotonic()

    def __call__(self, retry_state: RetryCallState) -> bool:
        elapsed = self._clock.monotonic() - self._started
        return elapsed + (retry_state.upcoming_sleep or 0.0) >= self._budget


class ImdsClient:
    """Talks to IMDS at ``base_url``. Build one per process and keep it: it owns the connection."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_version: str = DEFAULT_API_VERSION,
        timeouts: Timeouts = Timeouts(),
        retry: RetryPolicy = RetryPolicy(),
        clock: Clock,
        stop: threading.Event | None = None,
        logger: Any = None,
        jitter: Callable[[], float] = random.random,
        revalidate_seconds: float = 60.0,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._api_version = api_version
        self._timeouts = timeouts
        self._retry = retry
        self._clock = clock
        self._stop = stop if stop is not None else threading.Event()
        self._log = logger if logger is not None else structlog.get_logger("agent.imds")
        self._jitter = jitter
        self._lock = threading.Lock()
        # Never a proxy, never a .netrc (IMDS is link-local); every request within a deadline.
        self._session = DeadlineSession(stop=self._stop, max_body_bytes=MAX_BODY_BYTES)
        self._session.headers.update({"Metadata": "true", "User-Agent": "scheduled-events-agent"})
        self._service_warm = False
        self._etag: str | None = None
        self._etag_at = float("-inf")
        self._revalidate_seconds = revalidate_seconds
        self._last_body: bytes | None = None
        self._last_document: ScheduledEventsDocument | None = None
        self._last_retry_reason: str | None = None
        self._gave_up = False  # the last request ran out of retries (its caller was told)
        # The latest document as IMDS answered it, for the local mirror.
        self.copy = DocumentCopy()

    @property
    def scheduled_events_url(self) -> str:
        query = urlencode({"api-version": self._api_version})
        return f"{self._base_url}{SCHEDULED_EVENTS_PATH}?{query}"

    def close(self) -> None:
        self._session.close()

    def fetch_scheduled_events(
        self, *, budget_seconds: float | None = None
    ) -> ScheduledEventsDocument:
        """The current document. Raises ImdsError, DocumentError or OperationCancelled."""
        url = self.scheduled_events_url

        def attempt() -> ScheduledEventsDocument:
            # The ETag is only a hint (the docs never promise it, and the incarnation it
            # follows can start over): it is dropped after any failure, and a full GET is made
            # at least every revalidate_seconds whatever it says.
            fresh = self._clock.monotonic() - self._etag_at < self._revalidate_seconds
            headers = {"If-None-Match": self._etag} if self._etag and fresh else {}
            timeout = self._timeouts.read if self._service_warm else self._timeouts.first_read
            try:
                status, body, response_headers = self._send("GET", url, headers, None, timeout)
            except Exception:
                self._etag = None
                raise
            self._service_warm = True
            if status == 304 and self._last_document is not None:
                self.copy.confirmed(self._clock.monotonic())
                return self._last_document
            if status != 200:
                self._etag = None
                raise ImdsResponseInvalid(f"imds: unexpected status {status} from {url}", url=url)
            self._etag = response_headers.get("ETag")
            self._etag_at = self._clock.monotonic()
            if body == self._last_body and self._last_document is not None:
                self.copy.confirmed(self._clock.monotonic())
                return self._last_document
            try:
                document = parse_document_bytes(body)
            except DocumentError:
                self._etag = None
                raise
            self._last_body = body
            self._last_document = document
            self.copy.received(body, response_headers.get("Content-Type"), self._clock.monotonic())
            return document

        return self._with_retries(attempt, url, budget_seconds)

    def approve(
        self,
        event_ids: Sequence[str],
        *,
        document_incarnation: int | None = None,
        budget_seconds: float | None = None,
        still_wanted: Callable[[], bool] | None = None,
    ) -> None:
        """POST StartRequests for ``event_ids`` (as received) in one request.

        ``still_wanted`` is asked before every try, the first included: when it says no, the
        POST is not sent (again) and ApprovalWithdrawn is raised."""
        if not event_ids:
            raise ValueError("approve() needs at least one EventId")
        url = self.scheduled_events_url
        payload: dict[str, Any] = {
            "StartRequests": [{"EventId": event_id} for event_id in event_ids]
        }
        if document_incarnation is not None:
            payload["DocumentIncarnation"] = document_incarnation
        body = json.dumps(payload, separators=(",", ":")).encode()

        def attempt() -> None:
            if still_wanted is not None and not still_wanted():
                raise ApprovalWithdrawn(f"approval of {', '.join(event_ids)} no longer wanted")
            status, _, _ = self._send(
                "POST", url, {"Content-Type": "application/json"}, body, self._timeouts.read
            )
            if status != 200:
                raise ImdsResponseInvalid(
                    f"imds: approval of {', '.join(event_ids)} answered {status}", url=url
                )

        self._with_retries(attempt, url, budget_seconds)

    def fetch_instance_metadata(self, *, budget_seconds: float | None = None) -> InstanceMetadata:
        query = urlencode({"api-version": INSTANCE_API_VERSION})
        url = f"{self._base_url}{INSTANCE_PATH}?{query}"

        def attempt() -> InstanceMetadata:
            status, body, _ = self._send("GET", url, {}, None, self._timeouts.read)
            if status != 200:
                raise ImdsResponseInvalid(f"imds: unexpected status {status} from {url}", url=url)
            try:
                data = json_value(body)
            except ValueError:
                raise ImdsResponseInvalid(
                    f"imds: the answer of {url} is not JSON: {_snippet(body)}", url=url
                ) from None
            return InstanceMetadata.from_json(data, url)

        return self._with_retries(attempt, url, budget_seconds)

    def fetch_token(self, resource: str, *, budget_seconds: float | None = None) -> dict[str, str]:
        """A managed-identity token for ``resource``; every field a string, as IMDS gives them.

        Raises ImdsRequestRejected (status 400) when the VM has no identity assigned.
        """
        query = urlencode({"api-version": IDENTITY_API_VERSION, "resource": resource})
        url = f"{self._base_url}{IDENTITY_PATH}?{query}"

        def attempt() -> dict[str, str]:
            status, body, _ = self._send("GET", url, {}, None, self._timeouts.read)
            try:
                data = json_value(body)
            except ValueError:
                data = None
            token = data.get("access_token") if isinstance(data, dict) else None
            if status != 200 or not isinstance(token, str) or not _BEARER.fullmatch(token):
                raise ImdsResponseInvalid(
                    f"imds: no token in the answer of {url}: {_snippet(body)}", url=url
                )
            return {key: str(value) for key, value in data.items()}

        return self._with_retries(attempt, url, budget_seconds)

    def _with_retries(self, attempt: Callable[[], _T], url: str, budget: float | None) -> _T:
        budget_seconds = self._retry.budget_seconds if budget is None else budget

        def guarded() -> _T:
            if self._stop.is_set():
                raise OperationCancelled(f"stopped before a request to {url}")
            return attempt()

        def sleep(seconds: float) -> None:
            self._clock.wait(seconds)

        retrying = Retrying(
            retry=retry_if_exception_type(_TransientFailure),
            stop=stop_any(
                _StopBeforeBudget(self._clock, budget_seconds), stop_when_event_set(self._stop)
            ),
            wait=self._wait_seconds,
            sleep=sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            result = retrying(guarded)
        except _TransientFailure as failure:
            if self._stop.is_set():
                raise OperationCancelled(f"stopped while retrying {url}") from None
            attempts = retrying.statistics.get("attempt_number", 1)
            self._gave_up = True
            raise ImdsUnavailable(
                f"imds: {failure.description} from {url}; gave up after {attempts} attempts "
                f"in {budget_seconds:g} s (is this an Azure VM, and is imds.url right?)",
                url=url,
                status=failure.status,
                attempts=attempts,
                cause=failure.description,
            ) from None
        if self._last_retry_reason is not None:
            # After a give-up the caller was told of the failure, and tells of the recovery
            # itself (imds.poll_recovered): one recovery, one line.
            if not self._gave_up:
                self._log.info("imds.recovered", url=url, after=self._last_retry_reason)
            self._last_retry_reason = None
        self._gave_up = False
        return result

    def _wait_seconds(self, state: RetryCallState) -> float:
        exponential = self._retry.initial_wait_seconds * 2 ** (state.attempt_number - 1)
        wait: float = min(self._retry.max_wait_seconds, exponential) * (0.5 + self._jitter())
        failure = state.outcome.exception() if state.outcome else None
        if isinstance(failure, _TransientFailure) and failure.retry_after is not None:
            wait = max(wait, failure.retry_after)
        return wait

    def _log_retry(self, state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome else None
        reason = str(failure)
        wait = state.upcoming_sleep
        if reason != self._last_retry_reason:
            # A failure that repeats is logged once; its recovery is logged once too.
            self._log.warning(
                "imds.retrying",
                reason=reason,
                retry_in_seconds=round(wait, 2),
                attempt=state.attempt_number,
            )
            self._last_retry_reason = reason

    def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        read_timeout: float,
    ) -> tuple[int, bytes, Mapping[str, str]]:
        with self._lock:
            try:
                # The pair is the attempt's whole deadline: a trickled answer is cut there.
                response = self._session.request(
                    method,
                    url,
                    headers=dict(headers),
                    data=body,
                    timeout=(self._timeouts.connect, read_timeout),
                    allow_redirects=False,
                )
                payload = response.content
            except AnswerTooLarge as error:
                raise ImdsResponseInvalid(f"imds: {error}", url=url) from None
            except DeadlineExceeded:
                deadline = self._timeouts.connect + read_timeout
                raise _TransientFailure(
                    f"no complete answer within {deadline:g} s", None, None
                ) from None
            except requests.Timeout:
                raise _TransientFailure(f"timed out after {read_timeout:g} s", None, None) from None
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as error:
                raise _TransientFailure(
                    f"connection failed ({_reason(error)})", None, None
                ) from None
            except requests.RequestException as error:
                raise ImdsError(f"imds: cannot send {method} {url}: {error}", url=url) from None
        status = response.status_code
        if status in _TRANSIENT_STATUSES or status >= 500:
            raise _TransientFailure(
                f"{status} {response.reason}", status, _retry_after(response.headers)
            )
        if 400 <= status < 500:
            raise ImdsRequestRejected(
                f"imds: {method} {url} answered {status} {response.reason}: {_snippet(payload)} "
                "(check imds.api_version; IMDS also refuses requests that went through a proxy)",
                url=url,
                status=status,
            )
        return status, payload, response.headers


# A bearer token as HTTP carries it (RFC 6750's b64token): anything else, a non-Latin-1
# character or a line break, cannot go into an Authorization header.
_BEARER = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def _retry_after(headers: Mapping[str, str]) -> float | None:
    seconds = retry_after_seconds(headers.get("Retry-After", ""), at_most=float("inf"))
    return seconds if seconds is not None and seconds <= 120 else None


def _reason(error: Exception) -> str:
    text = str(error)
    for marker in ("Connection refused", "Connection reset", "RemoteDisconnected", "timed out"):
        if marker in text:
            return marker
    return text if len(text) <= 120 else text[:117] + "..."


def _snippet(body: bytes) -> str:
    text = body[:200].decode("utf-8", "replace").strip()
    return repr(text) if text else "(empty body)"


class TokenCache:
    """A managed-identity token for one resource, fetched from IMDS when needed and kept until
    five minutes before it expires. Thread-safe; ``forget`` drops a token a service refused."""

    def __init__(
        self,
        imds: ImdsClient,
        resource: str,
        *,
        clock: Clock,
        budget_seconds: float | None = None,
    ) -> None:
        self._imds = imds
        self._clock = clock
        self._resource = resource
        self._budget = budget_seconds
        self._token: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def get(self) -> str:
        """The token; raises ImdsError (ImdsRequestRejected when the VM has no identity)."""
        with self._lock:
            now = self._clock.now().timestamp()
            if self._token is not None and now < self._expires - 300:
                return self._token
            token = self._imds.fetch_token(self._resource, budget_seconds=self._budget)
            self._token = token["access_token"]
            expires = token.get("expires_on", "")
            # Unix seconds in ASCII digits; anything else (a superscript digit passes isdigit,
            # and float() refuses it) keeps the token for 50 minutes.
            readable = expires.isascii() and expires.isdigit() and len(expires) <= 12
            self._expires = float(expires) if readable else now + 3000
            return self._token

    def forget(self) -> None:
        with self._lock:
            self._token = None
