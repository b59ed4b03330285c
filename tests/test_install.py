"""The install script into a temporary root (DESTDIR), where systemd is not running, and the
unit file checked by systemd-analyze."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "scheduled-events-agent.service"
PREFIX = "/opt/scheduled-events-agent"


def install(destdir: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "DESTDIR": str(destdir), "PYTHON": sys.executable}
    return subprocess.run(
        [str(ROOT / "systemd" / "install.sh"), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
        check=False,
    )


def analyze(*arguments: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("systemd-analyze"), "systemd-analyze is needed (.ci/run installs systemd)"
    return subprocess.run(
        ["systemd-analyze", *arguments], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    destdir = tmp_path_factory.mktemp("root")
    completed = install(destdir)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return destdir


def test_the_agent_gets_its_own_virtual_environment_under_opt(installed: Path) -> None:
    command = installed / PREFIX.lstrip("/") / "bin" / "scheduled-events-agent"
    completed = subprocess.run(
        [str(command), "--version"], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("scheduled-events-agent ")
    link = installed / "usr/local/bin/scheduled-events-agent"
    assert os.readlink(link) == f"{PREFIX}/bin/scheduled-events-agent"
    assert (installed / PREFIX.lstrip("/") / "share/hooks/prepare.d/20-lb-probe-down").exists()


def test_the_configuration_directory_is_root_owned_0755_with_empty_hook_dirs(
    installed: Path,
) -> None:
    config_dir = installed / "etc/scheduled-events-agent"
    for directory in (config_dir, config_dir / "prepare.d", config_dir / "recover.d"):
        info = directory.stat()
        assert stat.S_IMODE(info.st_mode) == 0o755, directory
        if os.geteuid() == 0:
            assert info.st_uid == 0
    assert list((config_dir / "prepare.d").iterdir()) == []
    assert list((config_dir / "recover.d").iterdir()) == []
    assert (config_dir / "config.yaml").read_text() == (ROOT / "config.example.yaml").read_text()
    state = installed / "var/lib/scheduled-events-agent"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_the_unit_is_installed_and_enabled(installed: Path) -> None:
    unit = installed / "etc/systemd/system/scheduled-events-agent.service"
    assert unit.read_text() == UNIT.read_text()
    wants = installed / "etc/systemd/system/multi-user.target.wants/scheduled-events-agent.service"
    assert os.readlink(wants) == "../scheduled-events-agent.service"


def test_systemd_analyze_verify_reports_nothing(installed: Path, tmp_path: Path) -> None:
    # The unit names its command at its final place; point it into the staging root to check.
    staged = tmp_path / "scheduled-events-agent.service"
    staged.write_text(UNIT.read_text().replace(PREFIX, str(installed / PREFIX.lstrip("/"))))
    completed = analyze("verify", str(staged))
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout + completed.stderr == ""


def test_the_unit_rates_below_5_in_systemd_analyze_security() -> None:
    completed = analyze("security", "--offline=true", str(UNIT))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", completed.stdout)
    assert match, completed.stdout + completed.stderr
    assert float(match.group(1)) < 5.0
    assert match.group(2) == "OK"
    readme = (ROOT / "README.md").read_text()
    assert f"exposure level {match.group(1)}" in readme, "the README quotes the current figure"


def test_installing_again_keeps_the_operators_configuration(installed: Path) -> None:
    config = installed / "etc/scheduled-events-agent/config.yaml"
    config.write_text("vm_name: web_4\n")
    completed = install(installed)
    assert completed.returncode == 0, completed.stderr
    assert config.read_text() == "vm_name: web_4\n"
    assert "keeping the existing" in completed.stdout


def test_uninstall_removes_the_agent_and_keeps_configuration_and_state(tmp_path: Path) -> None:
    destdir = tmp_path / "root"
    assert install(destdir).returncode == 0
    (destdir / "var/lib/scheduled-events-agent/state.db").write_text("")
    completed = install(destdir, "--uninstall")
    assert completed.returncode == 0, completed.stderr
    assert not (destdir / PREFIX.lstrip("/")).exists()
    assert not (destdir / "etc/systemd/system/scheduled-events-agent.service").exists()
    assert not (
        destdir / "etc/systemd/system/multi-user.target.wants/scheduled-events-agent.service"
    ).is_symlink()
    assert not (destdir / "usr/local/bin/scheduled-events-agent").is_symlink()
    assert (destdir / "etc/scheduled-events-agent/config.yaml").exists()
    assert (destdir / "var/lib/scheduled-events-agent/state.db").exists()
    assert install(destdir, "--purge").returncode == 0
    assert not (destdir / "etc/scheduled-events-agent").exists()
    assert not (destdir / "var/lib/scheduled-events-agent").exists()


def test_a_wrong_argument_is_a_usage_error(tmp_path: Path) -> None:
    completed = install(tmp_path, "--sideways")
    assert completed.returncode == 2
    assert "usage" in completed.stderr


def test_the_install_script_passes_shellcheck() -> None:
    assert shutil.which("shellcheck"), "shellcheck is needed (.ci/run installs it)"
    completed = subprocess.run(
        ["shellcheck", "-s", "sh", str(ROOT / "systemd" / "install.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout
