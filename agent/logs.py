"""Logging: structlog configured once, by the command line.

JSON lines when not on a terminal (systemd's journal), readable coloured lines on one. Event
names read ``area.what_happened`` (``hook.finished``); fields are snake_case with units.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
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
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(output),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
