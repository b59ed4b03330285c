"""What ``status`` and ``history`` show: built from the state store, as text or as JSON.

Pure over the store's records: no I/O beyond the reads the caller passes in. The text is for a
terminal: every line is made printable (``logs.printable``), so an ESC sequence in an event's
Resources, a hook's output or a fleet record reaches the screen as ``\x1b``, never raw. The
JSON escapes control characters by itself.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from agent.lifecycle import ACTIVE
from agent.logs import printable
from agent.state import ELSEWHERE, EventRecord, Store


def event_summary(store: Store, record: EventRecord) -> dict[str, Any]:
    hooks = [
        {
            "phase": run.phase,
            "hook": run.hook,
            "outcome": run.outcome or "running or cut short",
            "exit_status": run.exit_status,
            "started_at": run.started_at,
            "ended_at": run.ended_at,
            "output_tail": run.output_tail,
        }
        for run in store.hook_runs(record.key)
    ]
    approvals = [
        {
            "source": approval.source,
            "outcome": approval.outcome or "sent, outcome unknown",
            "started_at": approval.started_at,
            "ended_at": approval.ended_at,
            "error": approval.error,
        }
        for approval in store.approvals(record.key)
    ]
    event = record.event
    not_before = event.not_before
    if not_before is None and record.announced_not_before is not None:
        not_before = datetime.fromisoformat(record.announced_not_before)
    return {
        "event_id": record.event_id,
        "occurrence": record.occurrence,
        "type": record.event_type,
        "status": event.status,  # as the document last showed it
        "first_status": record.first_status,
        # The announced one, kept once the event has started (IMDS then shows none).
        "not_before": not_before.isoformat() if not_before else None,
        # completed (left after Started), cancelled (left while Scheduled), or None.
        "ending": record.ending,
        "approved_elsewhere": any(a["source"] == ELSEWHERE for a in approvals),
        "resources": list(event.resources),
        "source": event.source,
        "description": event.description,
        "state": record.state,
        "reason": record.reason,
        "decision": record.decision,
        "first_seen": record.first_seen,
        "gone_at": record.gone_at,
        "duration_seconds": _duration(record.first_seen, record.gone_at),
        "hooks": hooks,
        "approvals": approvals,
    }


def status(store: Store) -> dict[str, Any]:
    meta = store.meta()
    pending = [event_summary(store, record) for record in store.events(states=ACTIVE)]
    maintenance = meta.get("maintenance")
    self_service = [
        event_summary(store, record)
        for record in store.events()
        if record.key.startswith("self-service:")
    ]
    return {
        "vm_name": meta.get("vm_name"),
        "last_poll_at": meta.get("last_poll_at"),
        "document_incarnation": meta.get("document_incarnation"),
        "events": pending,
        "maintenance": json.loads(maintenance) if maintenance else None,
        "maintenance_checked_at": meta.get("maintenance_checked_at"),
        "self_service_maintenances": self_service,
        "fleet": json.loads(meta["fleet"]) if "fleet" in meta else None,
    }


def history(store: Store, limit: int) -> list[dict[str, Any]]:
    return [event_summary(store, record) for record in store.events(limit=limit)]


def status_text(report: dict[str, Any]) -> str:
    if report.get("source") == "live":
        poll = f"last poll: {report['last_poll_at'] or 'none yet'}"
        where = f"live from the running agent (pid {report['pid']})"
    else:
        poll = f"last poll recorded: {report['last_poll_at'] or 'never'}"
        where = "from the state store" + (
            f": {report['source_note']}" if report.get("source_note") else ""
        )
    lines = [
        f"vm: {report['vm_name'] or 'unknown'}",
        f"{poll} (incarnation {report['document_incarnation'] or '-'}; {where})",
    ]
    windows = report.get("maintenance")
    if report.get("maintenance_checked_at") is None:
        lines.append("maintenance windows: not read yet")
    elif windows is None:
        lines.append(f"maintenance windows: none planned (read {report['maintenance_checked_at']})")
    else:
        lines.extend(
            [
                f"self-service window: {windows['self_service_start']} to "
                f"{windows['self_service_end']}; allowed now: "
                f"{'yes' if windows['allowed'] else 'no'}",
                f"scheduled window: {windows['scheduled_start']} to {windows['scheduled_end']}",
                f"last maintenance operation: {windows['last_result'] or '-'}"
                + (f" ({windows['last_message']})" if windows.get("last_message") else ""),
            ]
        )
    for taken in report.get("self_service_maintenances", []):
        lines.append(
            f"self-service maintenance {taken['event_id']}: {taken['decision'] or taken['state']}"
        )
    lines.extend(_fleet_lines(report.get("fleet")))
    if not report["events"]:
        lines.append("no events pending")
    for event in report["events"]:
        lines.extend(_event_lines(event))
    return "\n".join(map(printable, lines))


def _fleet_lines(fleet: dict[str, Any] | None) -> list[str]:
    if fleet is None:
        return []
    count = f", {fleet['slots']} slot(s)" if fleet.get("slots") else ""
    lines = [f"fleet: group {fleet['group']} ({fleet['backend']}{count})"]
    if fleet.get("recorded_at") is not None:
        holding = (
            f"holds {fleet['slot']} since {fleet['since']} for {', '.join(fleet['events'])}"
            if fleet.get("slot")
            else "holds no slot"
        )
        waiting = f"; waiting for a slot: {', '.join(fleet['waiting'])}" if fleet["waiting"] else ""
        lines.append(f"  this agent {holding}{waiting} (recorded {fleet['recorded_at']})")
        if fleet.get("problem"):
            lines.append(f"  coordinator failing: {fleet['problem']}")
    for slot in fleet.get("holders") or []:
        if not slot["held"]:
            lines.append(f"  {slot['name']}: free")
            continue
        down = (
            f", down for its maintenance until {slot['down_until']}"
            if slot.get("down_until")
            else ""
        )
        lines.append(
            f"  {slot['name']}: held by {slot['holder'] or '?'} for {slot['event_id'] or '?'} "
            f"since {slot['since'] or '?'}{down}"
        )
    queue = fleet.get("queue") or []
    if queue:
        lines.append("  in line for a slot (earliest NotBefore first):")
    for place, waiter in enumerate(queue, start=1):
        gone = "" if waiter["fresh"] else " (no heartbeat: not counted)"
        lines.append(
            f"    {place}. {waiter['holder']}: NotBefore {waiter['not_before'] or 'none'}, "
            f"waiting since {waiter['waiting_since']}{gone}"
        )
    if fleet.get("holders_error"):
        lines.append(f"  holders: unknown ({fleet['holders_error']})")
    return lines


def history_text(events: list[dict[str, Any]]) -> str:
    if not events:
        return "no events recorded"
    lines: list[str] = []
    for event in events:
        lines.extend(_event_lines(event))
    return "\n".join(map(printable, lines))


def _event_lines(event: dict[str, Any]) -> list[str]:
    # Once it has left the document, how it ended, not the status it last had there.
    shown = event["ending"] or event["status"]
    lines = [
        f"{event['event_id']}"
        + (f" (occurrence {event['occurrence']})" if event.get("occurrence", 1) > 1 else "")
        + f"  {event['type']}  {shown}  state={event['state']}",
        f"  seen {event['first_seen']}, NotBefore {event['not_before'] or '-'},"
        f" resources {' '.join(event['resources']) or '-'}",
        f"  why: {event['decision'] or event['reason']}",
    ]
    if event["duration_seconds"] is not None:
        lines.append(f"  over after {event['duration_seconds']:.0f} s")
    for hook in event["hooks"]:
        status = "" if hook["exit_status"] is None else f" (exit {hook['exit_status']})"
        lines.append(f"  {hook['phase']} hook {hook['hook']}: {hook['outcome']}{status}")
    for approval in event["approvals"]:
        if approval["source"] == ELSEWHERE:
            lines.append(
                f"  approved elsewhere (Started before NotBefore without our POST), seen at "
                f"{approval['started_at']}"
            )
            continue
        lines.append(
            f"  approval ({approval['source']}) at {approval['started_at']}: {approval['outcome']}"
        )
    return lines


def _duration(first_seen: str, gone_at: str | None) -> float | None:
    if gone_at is None:
        return None
    return (datetime.fromisoformat(gone_at) - datetime.fromisoformat(first_seen)).total_seconds()
