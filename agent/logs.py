"""Logging: structlog configured once, by the command line.

JSON lines when not on a terminal (systemd's journal), readable coloured lines on one. Event
names read ``area.what_happened`` (``hook.finished``); fields are snake_case with units.
"""

from __future__ import annotations

import logging
import sys
import unicodedata
from typing import Any, TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


# Characters that reorder text on a terminal (bidirectional overrides and isolates).
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (ESC, CR, NUL, newline, C1) and
    bidirectional controls written as escapes, like ``\\x1b``; the rest unchanged. Documents,
    hook output and other agents' records are data, never terminal commands."""
    if text.isprintable():
        return text
    return "".join(
        _escape(character)
        if unicodedata.category(character) == "Cc" or character in _BIDI_CONTROLS
        else character
        for character in text
    )


def _escape(character: str) -> str:
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _printable_values(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """For the console: every text field made ``printable`` (JSON lines escape by themselves)."""
    return {
        key: printable(value) if isinstance(value, str) else value for key, value in event.items()
    }


def configure(format_name: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog for the process. ``format_name``: auto | json | console."""
    output = stream if stream is not None else sys.stderr
    use_json = format_name == "json" or (format_name == "auto" and not output.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=output.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info
            if use_json
            else structlog.processors.StackInfoRenderer(),
            *(() if use_json else (_printable_values,)),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(output),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
