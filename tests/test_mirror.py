"""The local mirror: other tools on the VM read Scheduled Events from the agent's listener, byte
for byte what IMDS last answered, and cost IMDS no request. Approvals are refused there.

The agent runs as a real process against the emulator over HTTP; clients are plain requests
sessions, and one of them does what Microsoft's documented Python sample does.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from agent.mirror import DocumentCopy, Mirror
from tests.conftest import Emulator, wait_until
from tests.reliability.agents import AgentProcess
from tests.test_never_down import free_port

VERSION = "2020-07-01"
HEADERS = {"Metadata": "true"}


class Running:
    def __init__(self, agent: AgentProcess, port: int) -> None:
        self.agent = agent
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/metadata/scheduledevents?api-version={VERSION}"
        self.http = requests.Session()
        self.http.trust_env = False

    def get(self, **headers: str) -> requests.Response:
        return self.http.get(self.url, headers={**HEADERS, **headers}, timeout=5)


@pytest.fixture
def mirrored(live: Emulator, tmp_path: Path) -> Iterator[Running]:
    port = free_port()
    agent = AgentProcess(tmp_path, live.url, metrics={"listen": f"127.0.0.1:{port}"})
    running = Running(agent, port)

    def serving() -> bool:
        try:
            return running.get().status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_until(serving, timeout=30)
        yield running
    finally:
        running.http.close()
        agent.stop()


def imds_body(live: Emulator) -> bytes:
    response = live.http.get(
        f"{live.url}/metadata/scheduledevents", params={"api-version": VERSION}, headers=HEADERS
    )
    assert response.status_code == 200
    return response.content


def incarnation(response: requests.Response) -> int:
    value: int = response.json()["DocumentIncarnation"]
    return value


def test_the_mirror_serves_imds_body_byte_for_byte_with_an_etag_and_its_age(
    live: Emulator, mirrored: Running
) -> None:
    live.add_event(type="Reboot", resources=["web_5"], description="é, \u2028 and \\u00e9")
    wait_until(lambda: incarnation(mirrored.get()) == live.world.incarnation)
    answer = mirrored.get()
    assert answer.content == imds_body(live)
    assert answer.headers["Content-Type"].startswith("application/json")
    assert int(answer.headers["Age"]) >= 0
    etag = answer.headers["ETag"]
    again = mirrored.get(**{"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["ETag"] == etag
    assert mirrored.get(**{"If-None-Match": '"another"'}).status_code == 200
    live.add_event(type="Freeze", resources=["web_6"])
    wait_until(lambda: mirrored.get(**{"If-None-Match": etag}).status_code == 200)
    assert mirrored.get().headers["ETag"] != etag


def test_the_mirror_asks_what_imds_asks(mirrored: Running) -> None:
    http = mirrored.http
    assert http.get(mirrored.url, timeout=5).status_code == 400  # no Metadata header
    assert mirrored.get(**{"X-Forwarded-For": "10.0.0.1"}).status_code == 400
    no_version = http.get(f"{mirrored.base}/metadata/scheduledevents", headers=HEADERS, timeout=5)
    assert no_version.status_code == 400 and "api-version" in no_version.json()["error"]
    other = http.get(
        f"{mirrored.base}/metadata/scheduledevents?api-version=2017-11-01",
        headers=HEADERS,
        timeout=5,
    )
    assert other.status_code == 400 and VERSION in other.json()["error"]
    for query in (f"api-version=x&api-version={VERSION}", f"api-version={VERSION}&api-version="):
        both = http.get(
            f"{mirrored.base}/metadata/scheduledevents?{query}", headers=HEADERS, timeout=5
        )
        assert both.status_code == 400, query
    token = http.get(
        f"{mirrored.base}/metadata/identity/oauth2/token?api-version=2018-02-01",
        headers=HEADERS,
        timeout=5,
    )
    assert token.status_code == 404  # nothing but the document is served
    assert mirrored.get().status_code == 200


def test_an_approval_posted_to_the_mirror_is_refused_and_never_reaches_imds(
    live: Emulator, mirrored: Running
) -> None:
    event = live.add_event(type="Reboot", resources=["web_5"])
    wait_until(lambda: event["EventId"] in mirrored.get().text)
    body = json.dumps({"StartRequests": [{"EventId": event["EventId"]}]})
    refused = mirrored.http.post(mirrored.url, headers=HEADERS, data=body, timeout=5)
    assert refused.status_code == 403
    assert "prepare hook" in refused.json()["error"]
    assert live.control("GET", "approvals").json() == []
    assert mirrored.get().status_code == 200  # the connection and the mirror go on


def test_clients_of_the_mirror_cost_imds_no_request(live: Emulator, mirrored: Running) -> None:
    def imds_requests() -> int:
        count: int = live.control("GET", "stats").json()["scheduled_events_requests"]
        return count

    polls_before = imds_requests()
    for _ in range(200):
        assert mirrored.get().status_code == 200
    # The agent's own polls (every 0.25 s in these tests) go on meanwhile; 200 mirror reads
    # made none of their own.
    agent_polls = imds_requests() - polls_before
    assert agent_polls < 100, f"{agent_polls} requests reached IMDS during 200 mirror reads"


def test_a_client_written_like_microsofts_sample_works_against_the_mirror(
    live: Emulator, mirrored: Running
) -> None:
    """What the documented Python sample does, but for its URL: GET with the Metadata header
    and the api-version as a parameter, read the JSON, find this host's events, confirm them."""
    mine = live.add_event(type="Reboot", resources=[socket.gethostname()])
    url = f"{mirrored.base}/metadata/scheduledevents"
    wait_until(lambda: mine["EventId"] in mirrored.get().text)
    data: dict[str, Any] = requests.get(
        url, headers=HEADERS, params={"api-version": VERSION}, timeout=5
    ).json()
    handled = []
    for event in data["Events"]:
        if socket.gethostname() in event["Resources"]:
            payload = json.dumps({"StartRequests": [{"EventId": event["EventId"]}]})
            status = requests.post(
                url, headers=HEADERS, params={"api-version": VERSION}, data=payload, timeout=5
            ).status_code
            handled.append((event["EventId"], status))
    assert handled == [(mine["EventId"], 403)]
    assert live.control("GET", "approvals").json() == []


def test_before_any_document_the_mirror_says_to_come_back() -> None:
    now = [100.0]
    copy = DocumentCopy()
    mirror = Mirror(copy, api_version=VERSION, now=lambda: now[0])
    headers = {"Metadata": "true"}.get
    target = f"/metadata/scheduledevents?api-version={VERSION}"
    waiting = mirror.answer("GET", target, headers)
    assert waiting.status == 503 and waiting.headers["Retry-After"] == "1"
    copy.received(b'{"DocumentIncarnation":1,"Events":[]}', None, at=100.0)
    now[0] = 104.7
    first = mirror.answer("GET", target, headers)
    assert first.status == 200 and first.headers["Age"] == "4"
    copy.confirmed(at=104.0)
    assert mirror.answer("GET", target, headers).headers["Age"] == "0"
    copy.received(b'{"DocumentIncarnation":1,"Events":[]}', None, at=105.0)
    assert mirror.answer("GET", target, headers).headers["ETag"] == first.headers["ETag"]
    copy.received(b'{"DocumentIncarnation":2,"Events":[]}', None, at=105.0)
    assert mirror.answer("GET", target, headers).headers["ETag"] != first.headers["ETag"]
    assert mirror.answer("PUT", target, headers).status == 405
