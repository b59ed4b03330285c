"""The fault suite: each test counts what it tried; the counts are printed at the end of a run
(docs/RELIABILITY.md keeps the last ones)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

TRIED: Counter[str] = Counter()


@pytest.fixture
def tried() -> Counter[str]:
    return TRIED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TRIED:
        return
    terminalreporter.section("what the fault suite tried")
    for name, count in sorted(TRIED.items()):
        terminalreporter.write_line(f"{count:8d}  {name}")
