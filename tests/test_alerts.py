"""The alert rules: promtool checks them, and promtool's unit tests cover every rule."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

RULES = Path(__file__).resolve().parent.parent / "prometheus"


def promtool(*arguments: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("promtool"), "promtool is needed (.ci/run installs prometheus)"
    return subprocess.run(
        ["promtool", *arguments],
        capture_output=True,
        text=True,
        cwd=RULES,
        timeout=120,
        check=False,
    )


def test_promtool_check_rules_passes() -> None:
    completed = promtool("check", "rules", "alerts.yml")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "SUCCESS: 11 rules found" in completed.stdout


def test_promtool_test_rules_passes() -> None:
    completed = promtool("test", "rules", "alerts.test.yml")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "SUCCESS" in completed.stdout


def test_every_rule_has_a_firing_case_and_a_quiet_case() -> None:
    rules = yaml.safe_load((RULES / "alerts.yml").read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    cases = yaml.safe_load((RULES / "alerts.test.yml").read_text())["tests"]
    firing = {
        check["alertname"]
        for case in cases
        for check in case["alert_rule_test"]
        if check["exp_alerts"]
    }
    quiet = {
        check["alertname"]
        for case in cases
        for check in case["alert_rule_test"]
        if not check["exp_alerts"]
    }
    assert firing == names
    assert quiet == names
