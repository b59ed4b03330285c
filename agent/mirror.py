"""The local mirror of the Scheduled Events document, served on the agent's listener.

IMDS allows 5 requests a second per VM, for everything on it: every other tool that polls
Scheduled Events takes from the agent's share and crowds its polls into 429s. Pointed at
``http://127.0.0.1:9469`` instead of ``169.254.169.254``, such a tool gets the document the agent
last read, without a request to IMDS.

Invariants:
- The path and query are IMDS's: ``/metadata/scheduledevents?api-version=V``, where V is the
  version the agent polls (another version could have another shape, so it is refused, as IMDS
  refuses one it does not know). ``Metadata: true`` is required and a request carrying
  ``X-Forwarded-For`` is refused, as IMDS does.
- The body is byte for byte what IMDS last answered, with its Content-Type; the ETag is a hash
  of those bytes (so it changes exactly when they do), ``If-None-Match`` gets a 304, and
  ``Age`` says how many seconds ago IMDS last confirmed the document (it grows while IMDS
  cannot be reached).
- Approvals are refused (403, with why): the agent approves this VM's events once its prepare
  hooks have succeeded, and an approval from elsewhere would start the maintenance before they
  have. Nothing is ever sent to IMDS on a client's behalf.
- Before the agent has read a document, the answer is 503 with ``Retry-After: 1``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qs, urlsplit

PATH = "/metadata/scheduledevents"
_JSON = "application/json; charset=utf-8"


@dataclass(frozen=True)
class Snapshot:
    """A document as IMDS answered it, and when IMDS last confirmed it (monotonic seconds)."""

    body: bytes
    content_type: str
    etag: str
    confirmed_at: float


class DocumentCopy:
    """The latest document the agent read: written by the poller, read by the listener."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._body: bytes | None = None
        self._content_type = _JSON
        self._etag: str | None = None  # hashed when first asked for, not on the poller's way
        self._at = 0.0

    def received(self, body: bytes, content_type: str | None, at: float) -> None:
        """IMDS answered ``body`` at ``at``."""
        with self._lock:
            if body != self._body:
                self._body, self._etag = body, None
            self._content_type = content_type or _JSON
            self._at = at

    def confirmed(self, at: float) -> None:
        """IMDS said the document is unchanged (a 304, or the same bytes) at ``at``."""
        with self._lock:
            self._at = at

    def latest(self) -> Snapshot | None:
        with self._lock:
            if self._body is None:
                return None
            if self._etag is None:
                self._etag = '"' + hashlib.blake2b(self._body, digest_size=12).hexdigest() + '"'
            return Snapshot(self._body, self._content_type, self._etag, self._at)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


def _error(status: int, message: str, **headers: str) -> Answer:
    body = (json.dumps({"error": message}) + "\n").encode()
    return Answer(status, {"Content-Type": _JSON, **headers}, body)


class Mirror:
    def __init__(self, copy: DocumentCopy, *, api_version: str, now: Callable[[], float]) -> None:
        self._copy = copy
        self._api_version = api_version
        self._now = now

    def answer(self, method: str, target: str, header: Callable[[str], str | None]) -> Answer:
        """The answer to ``method target``; ``header(name)`` gives a request header's value
        (names without regard to case), or None."""
        parts = urlsplit(target)
        path = parts.path.rstrip("/")
        if path != PATH:
            return _error(404, f"not found: only {PATH} is mirrored here")
        if method == "POST":
            return _error(
                403,
                "approvals are not taken here: scheduled-events-agent approves this VM's events "
                "once its prepare hooks have succeeded. To run something before maintenance, "
                "make it a prepare hook; to approve regardless, POST to IMDS itself",
            )
        if method not in ("GET", "HEAD"):
            return _error(405, f"method {method} not allowed", Allow="GET, HEAD")
        if (header("Metadata") or "").strip().lower() != "true":
            return _error(400, "Bad request. Required metadata header not specified")
        if header("X-Forwarded-For") is not None:
            return _error(400, "Bad request. Request contains X-Forwarded-For header")
        versions = parse_qs(parts.query, keep_blank_values=True).get("api-version")
        if not versions:
            return _error(400, "Bad request. api-version was not specified")
        other = next((version for version in versions if version != self._api_version), None)
        if other is not None:  # every one given must be the one served
            return _error(
                400,
                f"Bad request. api-version {other} is not mirrored here: the agent polls "
                f"{self._api_version}, and only that document is served",
            )
        snapshot = self._copy.latest()
        if snapshot is None:
            return _error(
                503, "no document yet: the agent has not read one from IMDS", **{"Retry-After": "1"}
            )
        age = str(max(0, int(self._now() - snapshot.confirmed_at)))
        common = {"ETag": snapshot.etag, "Age": age, "Cache-Control": "no-cache"}
        if _matches(header("If-None-Match"), snapshot.etag):
            return Answer(304, common, b"")
        return Answer(200, {"Content-Type": snapshot.content_type, **common}, snapshot.body)


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = [tag.strip() for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags or f"W/{etag}" in tags
