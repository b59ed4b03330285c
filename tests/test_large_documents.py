"""A document that carries hundreds of other VMs' events (an availability set, a scale-set
placement group) never delays this VM's own: its events are read, recorded and handed to their
workers first, and the others are written in one transaction, not one fsync each.

Real parts: the emulator over HTTP, a real SQLite file, the daemon's real workers and hooks.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

import agent.events
from agent.events import parse_document, parse_document_bytes
from agent.lifecycle import IGNORED
from agent.state import Store
from agent.workers import Workers
from tests.agent_harness import RunningAgent, build_agent, calls, start_agent
from tests.conftest import Emulator, approved_ids, wait_until

OTHERS = 300


@pytest.fixture
def agents() -> Iterator[list[RunningAgent]]:
    running: list[RunningAgent] = []
    yield running
    for running_agent in running:
        running_agent.close()


def wire_event(event_id: str, resources: list[Any], **fields: Any) -> dict[str, Any]:
    return {
        "EventId": event_id,
        "EventStatus": "Scheduled",
        "EventType": "Reboot",
        "ResourceType": "VirtualMachine",
        "Resources": resources,
        "NotBefore": "Wed, 24 Jan 2018 21:20:44 GMT",
        **fields,
    }


def test_this_vms_events_are_read_without_reading_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    others = [wire_event(f"other-{n}", [f"web_{1000 + n}"]) for n in range(2000)]
    body = {"DocumentIncarnation": 7, "Events": [*others, wire_event("mine", ["web_4"])]}
    read: list[object] = []
    parse_event = agent.events._parse_event

    def counting(raw: object, path: str) -> agent.events.ScheduledEvent:
        read.append(raw)
        return parse_event(raw, path)

    monkeypatch.setattr(agent.events, "_parse_event", counting)
    document = parse_document(body)
    assert [event.event_id for event in document.affecting("web_4")] == ["mine"]
    found = document.find("MINE")
    assert found is not None and found.event_id == "mine"
    assert len(read) == 1, f"{len(read)} entries were read to find this VM's one event"
    assert len(document.events) == 2001  # and the rest is there when asked for


# Any entry: readable or not, for this VM or another, its EventId possibly repeated.
entry_ids = st.sampled_from(["a", "A", "b", "c", 7, None])
entry_resources = st.sampled_from(
    [["web_4"], ["WEB_4", "web_5"], ["_web_4"], ["web_5"], [], ["web_4", 3], "web_4", None]
)
entries = st.one_of(
    st.builds(
        lambda event_id, resources, not_before: {
            **({} if event_id is None else {"EventId": event_id}),
            "EventStatus": "Scheduled",
            "EventType": "Freeze",
            **({} if resources is None else {"Resources": resources}),
            "NotBefore": not_before,
        },
        entry_ids,
        entry_resources,
        st.sampled_from(["", "Wed, 24 Jan 2018 21:20:44 GMT", "tomorrow"]),
    ),
    st.sampled_from([None, 5, "web_4", ["web_4"]]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(entries, max_size=8))
def test_reading_one_vms_events_first_gives_the_verdicts_of_reading_the_whole(
    raw_events: list[Any],
) -> None:
    body = {"DocumentIncarnation": 1, "Events": raw_events}
    whole = parse_document(body)
    assert whole.events is not None  # read whole first
    first = parse_document(body)
    assert first.affecting("web_4") == whole.affecting("web_4")
    for key in ("a", "B", "c", "7", "none"):
        assert first.find(key) == whole.find(key)
    assert first.events == whole.events
    assert first.unreadable == whole.unreadable
    assert first == whole


def traced(store: Store) -> list[str]:
    """Every statement the store's own connection runs from now on."""
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    return statements


def wakes_noted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys every worker pool is asked to wake from now on, in order."""
    woken: list[str] = []
    wake = Workers.wake

    def noting(workers: Workers, key: str) -> None:
        woken.append(key)
        wake(workers, key)

    monkeypatch.setattr(Workers, "wake", noting)
    return woken


def rows_on_disk(path: Path) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as reader:
        (count,) = reader.execute("SELECT count(*) FROM events").fetchone()
    return int(count)


def test_this_vms_event_is_recorded_and_its_hook_started_before_the_others_are_recorded(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent], monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(OTHERS):
        live.world.add({"type": "Reboot", "resources": [f"web_{1000 + n}"]})
    mine = live.add_event(type="Preempt")  # last in the document: the worst place
    agents.append(agent := build_agent(tmp_path, live.url))
    state_file = tmp_path / "state.db"
    woken: list[tuple[str, int]] = []
    wake = Workers.wake

    def noting(workers: Workers, key: str) -> None:
        woken.append((key, rows_on_disk(state_file)))
        wake(workers, key)

    monkeypatch.setattr(Workers, "wake", noting)
    hook_running_when_others_recorded: list[bool] = []
    discover_ignored = getattr(Store, "discover_ignored", None)

    def after_the_hook(store: Store, *arguments: Any, **options: Any) -> None:
        runs = store.hook_runs(mine["EventId"].lower(), "prepare")
        hook_running_when_others_recorded.append(len(runs) == 1)
        assert discover_ignored is not None
        discover_ignored(store, *arguments, **options)

    monkeypatch.setattr(Store, "discover_ignored", after_the_hook, raising=False)
    statements = traced(agent.store)
    assert agent.daemon.poll()
    key = mine["EventId"].lower()
    woken = [(woke, rows) for woke, rows in woken if agent.store.get(woke) is not None]
    assert woken[0] == (key, 1), f"first woken: {woken[:1]}, with the rows on disk then"
    assert hook_running_when_others_recorded == [True]
    assert rows_on_disk(state_file) == OTHERS + 1
    commits = [s for s in statements if s.strip().upper() == "COMMIT"]
    # This VM's event, its hook run (started, its process), the others in one: not 300 more.
    assert len(commits) < 10, f"{len(commits)} commits for one document"
    wait_until(lambda: f"end prepare Preempt {mine['EventId']}" in calls(tmp_path))


def test_a_changed_document_wakes_no_worker_for_other_vms_events(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent], monkeypatch: pytest.MonkeyPatch
) -> None:
    others = [
        live.world.add({"type": "Reboot", "resources": [f"web_{1000 + n}"]}).event_id
        for n in range(50)
    ]
    agents.append(agent := build_agent(tmp_path, live.url))
    assert agent.daemon.poll()
    assert {agent.store.get(event_id).state for event_id in others} == {IGNORED}  # type: ignore[union-attr]
    woken = wakes_noted(monkeypatch)
    statements = traced(agent.store)
    live.world.add({"type": "Reboot", "resources": ["web_2000"]})
    moved = live.add_event(type="Freeze", resources=["web_1000"])
    live.control("PATCH", f"events/{others[1]}", {"resources": ["web_1001", "web_1002"]})
    assert agent.daemon.poll()
    assert set(woken) & {event_id.lower() for event_id in others} == set()
    # (Woken keys this store does not know are an earlier test's workers, winding down.)
    mine = [key for key in woken if agent.store.get(key) is not None]
    assert mine == [], f"workers woken for other VMs' events: {mine}"
    record = agent.store.get(others[1])
    assert record is not None and record.event.resources == ("web_1001", "web_1002")
    assert agent.store.get(moved["EventId"]) is not None
    commits = [s for s in statements if s.strip().upper() == "COMMIT"]
    assert len(commits) <= 2, f"{len(commits)} commits: the new ones and the changed one"


def test_an_other_vms_event_that_comes_to_name_this_vm_is_prepared(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    other = live.add_event(type="Reboot", resources=["web_5"], not_before_in_seconds=600)
    agents.append(agent := build_agent(tmp_path, live.url))
    assert agent.daemon.poll()
    assert agent.store.get(other["EventId"]).state == IGNORED  # type: ignore[union-attr]
    live.control("PATCH", f"events/{other['EventId']}", {"resources": ["web_5", "web_4"]})
    assert agent.daemon.poll()
    wait_until(lambda: f"end prepare Reboot {other['EventId']}" in calls(tmp_path))


def test_a_large_body_is_taken_in_whole() -> None:
    """The same verdicts at any size: 5,000 events, one of them this VM's, one unreadable."""
    raw = [wire_event(f"other-{n}", [f"web_{10_000 + n}"]) for n in range(5000)]
    raw[2500] = wire_event("broken", ["web_4"], NotBefore="tomorrow")
    raw.append(wire_event("mine", ["web_4"]))
    document = parse_document_bytes(json.dumps({"DocumentIncarnation": 3, "Events": raw}))
    assert [event.event_id for event in document.affecting("web_4")] == ["mine"]
    assert len(document.events) == 5000
    (unreadable,) = document.unreadable
    assert unreadable.event_id == "broken" and unreadable.may_affect("web_4")


def test_other_vms_events_that_cannot_be_recorded_are_taken_in_again_by_the_next_poll(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent], monkeypatch: pytest.MonkeyPatch
) -> None:
    other = live.add_event(type="Reboot", resources=["web_5"])
    agents.append(agent := build_agent(tmp_path, live.url))
    discover_ignored = Store.discover_ignored
    failures = [RuntimeError("disk on fire")]

    def failing_once(store: Store, *arguments: Any, **options: Any) -> None:
        if failures:
            raise failures.pop()
        discover_ignored(store, *arguments, **options)

    monkeypatch.setattr(Store, "discover_ignored", failing_once)
    with capture_logs() as logs:
        assert agent.daemon.poll()
        assert agent.store.get(other["EventId"]) is None
        assert agent.daemon.poll()  # the same document: taken in again all the same
    record = agent.store.get(other["EventId"])
    assert record is not None and record.state == IGNORED
    (failed,) = [log for log in logs if log["event"] == "document.intake_failed"]
    assert "disk on fire" in failed["reason"]


def test_this_vms_event_wakes_no_worker_for_other_vms_events_from_start_to_end(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent], monkeypatch: pytest.MonkeyPatch
) -> None:
    others = {
        live.world.add({"type": "Reboot", "resources": [f"web_{1000 + n}"]}).event_id.lower()
        for n in range(OTHERS)
    }
    woken = wakes_noted(monkeypatch)
    agents.append(start_agent(tmp_path, live.url))
    mine = live.add_event(type="Reboot", not_before_in_seconds=600, started_for_seconds=0.2)
    wait_until(lambda: f"end recover Reboot {mine['EventId']}" in calls(tmp_path))
    assert approved_ids(live) == [mine["EventId"]]
    # Each hook's end and each move wake the events that may wait on it: never the ignored.
    assert others & set(woken) == set(), f"{len(others & set(woken))} ignored events woken"


def test_an_ignored_event_that_comes_to_name_this_vm_goes_before_the_others(
    live: Emulator, tmp_path: Path, agents: list[RunningAgent], monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(OTHERS):
        live.world.add({"type": "Reboot", "resources": [f"web_{1000 + n}"]})
    ignored = live.add_event(type="Reboot", resources=["web_5"], not_before_in_seconds=600)
    agents.append(agent := build_agent(tmp_path, live.url))
    assert agent.daemon.poll()
    key = ignored["EventId"].lower()
    hook_runs_when_others_written: list[int] = []
    discover_ignored = Store.discover_ignored

    def after_the_hook(store: Store, *arguments: Any, **options: Any) -> None:
        hook_runs_when_others_written.append(len(store.hook_runs(key, "prepare")))
        discover_ignored(store, *arguments, **options)

    monkeypatch.setattr(Store, "discover_ignored", after_the_hook)
    live.control("PATCH", f"events/{ignored['EventId']}", {"resources": ["web_5", "web_4"]})
    live.world.add({"type": "Reboot", "resources": ["web_3000"]})  # and one other VM's, new
    assert agent.daemon.poll()
    assert hook_runs_when_others_written == [1]
    wait_until(lambda: f"end prepare Reboot {ignored['EventId']}" in calls(tmp_path))


def test_an_event_id_in_two_entries_makes_every_copy_unreadable_even_a_well_formed_one() -> None:
    broken = wire_event("HALF-4", ["web_9"])
    del broken["EventStatus"]
    body = {"DocumentIncarnation": 2, "Events": [wire_event("half-4", ["web_4"]), broken]}
    for document in (parse_document(body), parse_document(body)):
        assert document.affecting("web_4") == ()
        assert document.find("half-4") is None
        assert document.events == ()
        assert {entry.path for entry in document.unreadable} == {
            "$.Events[0].EventId",
            "$.Events[1].EventStatus",
        }


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [31, 900])
def test_an_event_nested_too_deep_is_unreadable_wherever_it_is_read(depth: int) -> None:
    """The verdict is the same in a shallow thread and a deep one: it never depends on how
    much stack is left when the event is copied."""
    body = {
        "DocumentIncarnation": 2,
        "Events": [wire_event("deep", ["web_4"], Extra=nested(depth))],
    }
    shallow = parse_document(body).affecting("web_4")
    verdicts: list[int] = []

    def deep_down(levels: int) -> None:
        if levels:
            deep_down(levels - 1)
            return
        verdicts.append(len(parse_document(body).affecting("web_4")))

    thread = threading.Thread(target=deep_down, args=(800,))
    thread.start()
    thread.join()
    assert verdicts == [len(shallow)]
    assert len(shallow) == (1 if depth == 31 else 0)  # the event itself is a level
    if depth > 31:
        (unreadable,) = parse_document(body).unreadable
        assert "nested more than 32 levels" in unreadable.reason
