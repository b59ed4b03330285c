"""Hostile input: 10,000 generated documents through the parser and next_step; hostile
strings in every field reach hooks only as data; a 10 MB document is refused cleanly."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.clock import SystemClock
from agent.errors import DocumentError, ImdsResponseInvalid
from agent.events import parse_document, parse_document_bytes
from agent.imds import ImdsClient, RetryPolicy
from agent.lifecycle import (
    APPROVED,
    APPROVING,
    IGNORED,
    PREPARING,
    WAITING,
    Move,
    PhaseHooks,
    Policy,
    Situation,
    next_step,
    transition,
)
from tests.agent_harness import start_agent
from tests.conftest import Emulator, wait_until

HOSTILE = [
    "$(touch {marker})",
    "`touch {marker}`",
    "; touch {marker}",
    "a\ntouch {marker}\n",
    "' \" \\ \x1b[31m \u202e \U0001f600 %s %n {{}}",
    "../../../../etc/passwd",
    "x" * 70_000,
]
text = st.text(max_size=40) | st.sampled_from([h.format(marker="/tmp/no")[:2000] for h in HOSTILE])
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=3),
    max_leaves=12,
)
well_formed = st.fixed_dictionaries(
    {
        "EventId": st.uuids().map(str),
        "EventStatus": st.sampled_from(["Scheduled", "Started"]),
        "EventType": st.sampled_from(["Reboot", "Preempt", "Freeze"]) | text.filter(str.strip),
        "Resources": st.lists(st.sampled_from(["web_4", "web_5"]) | text, max_size=3),
        "NotBefore": st.sampled_from(["", "Mon, 19 Sep 2016 18:29:47 GMT", "2026-04-29T18:00:00Z"]),
    },
    optional={"Description": text, "EventSource": text, "DurationInSeconds": st.integers()},
)
loose = st.fixed_dictionaries(
    {},
    optional={
        "EventId": text | values,
        "EventStatus": st.sampled_from(["Scheduled", "Started"]) | text,
        "EventType": st.sampled_from(["Reboot", "Preempt"]) | text,
        "Resources": st.lists(st.sampled_from(["web_4", "web_5"]) | text, max_size=3) | values,
        "NotBefore": st.sampled_from(["", "Mon, 19 Sep 2016 18:29:47 GMT"]) | text,
        "DurationInSeconds": st.integers() | values,
        "Description": text | values,
    },
)
documents = (
    st.fixed_dictionaries(
        {
            "DocumentIncarnation": st.integers(0, 10**6) | values,
            "Events": st.lists(
                well_formed | loose, max_size=4, unique_by=lambda e: str(e.get("EventId")).lower()
            ),
        }
    )
    | values
)

COUNTS: Counter[str] = Counter()
NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=timezone.utc)


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    documents, st.sampled_from([PREPARING, APPROVING, APPROVED, WAITING, IGNORED]), st.booleans()
)
def test_generated_documents_through_the_parser_and_next_step(
    raw: Any, stored_state: str, present: bool
) -> None:
    COUNTS["documents"] += 1
    try:
        document = parse_document(raw)
    except DocumentError:
        COUNTS["refused with DocumentError"] += 1
        return
    COUNTS["unreadable entries set aside"] += len(document.unreadable)
    policy = Policy(vm_name="web_4", types=("Reboot", "Preempt"))
    drained = PhaseHooks(("10-drain",), {"10-drain": "succeeded"})
    for event in document.events:
        step = next_step(
            Situation(
                state=stored_state,
                event=event,
                present=present,
                readable=True,
                self_service=False,
                prepare=drained,
                recover=PhaseHooks((), {}),
                approval_may_have_landed=False,
                others_in_flight=False,
                recover_running=False,
                now=NOW,
            ),
            policy,
        )
        if isinstance(step, Move):
            transition(event.event_id, stored_state, step.trigger)  # a legal move, always
    # The readable events round-trip (the unreadable entries are not written back).
    again = parse_document(json.loads(json.dumps(document.to_wire())))
    assert (again.incarnation, again.events, again.unreadable) == (
        document.incarnation,
        document.events,
        (),
    )
    COUNTS["parsed and decided"] += 1


def test_the_generated_count(tried: Counter[str]) -> None:
    # Runs after the property above in file order; records what it went through.
    assert COUNTS["documents"] >= 10_000
    tried.update({f"generated documents: {k}": v for k, v in COUNTS.items()})


def test_hostile_strings_in_every_field_reach_hooks_only_as_data(
    start_emulator: Callable[..., Emulator], tmp_path: Path, tried: Counter[str]
) -> None:
    emulator = start_emulator(real_time=True)
    marker = tmp_path / "pwned"
    dump = tmp_path / "dump"
    dump.mkdir()
    agent = start_agent(tmp_path, emulator.url)
    hook = tmp_path / "prepare.d" / "05-dump"
    hook.write_text(
        "#!/bin/sh\n"
        f'out="{dump}/$(date +%s%N)"\n'
        'cat > "$out.json"\n'
        'printf "%s" "$SCHEDULED_EVENT_DESCRIPTION" > "$out.description"\n'
        'printf "%s" "$SCHEDULED_EVENT_TYPE" > "$out.type"\n'
    )
    hook.chmod(0o755)
    try:
        sent = []
        for index, pattern in enumerate(HOSTILE):
            hostile = pattern.format(marker=marker)
            body = {
                "type": "Reboot",
                "resources": ["web_4", hostile[:200] or "x"],
                "description": hostile,
                "source": hostile[:200],
                "event_id": f"{index}-{hostile[:30]}",
            }
            created = emulator.add_event(**body)
            sent.append(created)
        hostile_type = emulator.add_event(type=HOSTILE[0].format(marker=marker))
        sent.append(hostile_type)  # an unknown type: recorded and ignored, never run
        wait_until(lambda: len(list(dump.glob("*.json"))) >= len(HOSTILE), timeout=30)
        wait_until(
            lambda: all(agent.store.get(event["EventId"]) is not None for event in sent),
            timeout=30,
        )
    finally:
        agent.close()
    assert not marker.exists()
    received = [json.loads(path.read_text()) for path in dump.glob("*.json")]
    for payload in received:
        event = payload["event"]
        original = next(e for e in sent if e["EventId"] == event["EventId"])
        assert event == original  # every field exactly as IMDS sent it
        stem = str(next(p for p in dump.glob("*.json") if json.loads(p.read_text()) == payload))
        description = Path(stem[: -len(".json")] + ".description").read_text()
        assert description == original["Description"][: 32 * 1024]
    tried["hostile strings sent through every field"] += len(sent)
    tried["hostile events that reached a hook as data"] += len(received)


def test_a_10_mb_document_is_refused_cleanly(
    start_emulator: Callable[..., Emulator], tmp_path: Path, tried: Counter[str]
) -> None:
    emulator = start_emulator(real_time=True)
    huge = json.dumps(
        {
            "DocumentIncarnation": 1,
            "Events": [
                {
                    "EventId": str(n),
                    "EventStatus": "Scheduled",
                    "EventType": "Reboot",
                    "Resources": ["web_9"],
                    "NotBefore": "",
                    "Description": "x" * 1000,
                }
                for n in range(10_000)
            ],
        }
    )
    assert len(huge) > 10_000_000
    emulator.control("POST", "faults", {"body": huge, "count": 1})
    client = ImdsClient(emulator.url, clock=SystemClock(), retry=RetryPolicy(budget_seconds=1))
    try:
        parse_document_bytes(huge)  # the parser itself copes; the client refuses the size
        try:
            client.fetch_scheduled_events()
        except ImdsResponseInvalid as error:
            assert "byte limit" in str(error)
        else:
            raise AssertionError("a 10 MB document was accepted")
        assert client.fetch_scheduled_events().events == ()
    finally:
        client.close()
    tried["10 MB document refused"] += 1
