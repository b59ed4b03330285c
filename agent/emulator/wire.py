"""How the emulator writes what IMDS writes: api-versions, dates, field gating, compact JSON.

Written apart from ``agent.events`` on purpose (README, The emulator): nothing here is shared
with the agent's model, so that a misreading of Azure in one is caught by the other in the tests.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

# docs/AZURE.md section 1: the Scheduled Events versions; nothing newer than 2020-07-01 exists.
SCHEDULED_EVENTS_VERSIONS = (
    "2017-03-01",
    "2017-08-01",
    "2017-11-01",
    "2019-01-01",
    "2019-04-01",
    "2019-08-01",
    "2020-07-01",
)
# The instance metadata versions, which /metadata/versions lists. They are a different list:
# most Scheduled Events versions are not in it.
INSTANCE_VERSIONS = (
    "2017-03-01",
    "2017-04-02",
    "2017-08-01",
    "2017-10-01",
    "2017-12-01",
    "2018-02-01",
    "2018-04-02",
    "2018-10-01",
    "2019-02-01",
    "2019-03-11",
    "2019-04-30",
    "2019-06-01",
    "2019-06-04",
    "2019-08-01",
    "2019-08-15",
    "2019-11-01",
    "2020-06-01",
    "2020-07-15",
    "2020-09-01",
    "2020-10-01",
    "2020-12-01",
    "2021-01-01",
    "2021-02-01",
    "2021-03-01",
    "2021-05-01",
    "2021-08-01",
    "2021-10-01",
    "2021-11-01",
    "2021-11-15",
    "2021-12-13",
    "2022-02-01",
    "2022-03-01",
    "2022-05-01",
    "2022-07-15",
    "2022-08-01",
    "2022-09-01",
    "2022-11-01",
    "2023-07-01",
    "2023-11-15",
    "2024-03-15",
    "2025-04-07",
)
TOKEN_VERSIONS = ("2018-02-01", "2019-08-01", "2019-11-01", "2021-02-01")

# Since which api-version each optional field, and each younger event type, is served.
FIELD_SINCE = {
    "Description": "2019-04-01",
    "EventSource": "2019-08-01",
    "DurationInSeconds": "2020-07-01",
}
TYPE_SINCE = {"Preempt": "2017-11-01", "Terminate": "2019-01-01"}
# Before 2017-08-01 the VM names in Resources carried a leading underscore.
UNDERSCORE_NAMES_BEFORE = "2017-08-01"

_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(moment: datetime) -> str:
    """RFC 1123, as IMDS writes NotBefore: ``Wed, 24 Jan 2018 21:20:44 GMT``."""
    utc = moment.astimezone(timezone.utc)
    return (
        f"{_WEEKDAYS[utc.weekday()]}, {utc.day:02d} {_MONTHS[utc.month - 1]} {utc.year:04d} "
        f"{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d} GMT"
    )


def iso_utc(moment: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``, milliseconds kept: what the control API writes."""
    utc = moment.astimezone(timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def compact_json(value: Any) -> bytes:
    """IMDS's compact JSON: no spaces, no trailing newline."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def version_at_least(version: str, since: str) -> bool:
    # The versions are ISO dates, so their strings sort in time order.
    return version >= since
