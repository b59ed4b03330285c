"""Shared Key authorisation of the Blob service: the request signature."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlsplit


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
