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


def test_the_unit_rates_at_most_3_5_in_systemd_analyze_security() -> None:
    completed = analyze("security", "--offline=true", str(UNIT))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", completed.stdout)
    assert match, completed.stdout + completed.stderr
    assert float(match.group(1)) <= 3.5
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


def unit_settings(name: str) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in UNIT.read_text().splitlines()
        if line.startswith(f"{name}=")
    ]


def syscalls(group: str, seen: set[str] | None = None) -> set[str]:
    """The system calls of a systemd filter group, nested groups expanded, as systemd-analyze
    lists them on this machine."""
    seen = set() if seen is None else seen
    seen.add(group)
    completed = analyze("syscall-filter", group)
    assert completed.returncode == 0, completed.stderr
    found: set[str] = set()
    for line in completed.stdout.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if item.startswith("@"):
            if item not in seen:
                found |= syscalls(item, seen)
        else:
            found.add(item)
    return found


def allowed_syscalls() -> set[str]:
    """What the unit's SystemCallFilter= lines allow, read as systemd does: the first line is
    an allow list, each line starting with ~ takes its groups away."""
    allowed: set[str] = set()
    for value in unit_settings("SystemCallFilter"):
        deny = value.startswith("~")
        groups = value.lstrip("~").split()
        members = set().union(*(syscalls(g) if g.startswith("@") else {g} for g in groups))
        allowed = allowed - members if deny else allowed | members
    return allowed


# What runuser, su and sudo -u (user switch), cp -p and install -o (owners), nice (priority)
# call, and what the agent's hook shepherd calls (subreaper, pidfd, fexecve).
HOOK_SYSCALLS = {
    "setuid": "runuser, su, sudo -u",
    "setgid": "runuser, su, sudo -u",
    "setresuid": "runuser, su, sudo -u",
    "setresgid": "runuser, su, sudo -u",
    "setgroups": "runuser, su, sudo -u",
    "chown": "install -o",
    "fchown": "cp -p, install -o",
    "fchownat": "cp -p",
    "lchown": "cp -P -p",
    "setpriority": "nice",
    "prctl": "the shepherd (PR_SET_CHILD_SUBREAPER)",
    "pidfd_open": "the shepherd",
    "pidfd_send_signal": "the shepherd",
    "execveat": "the shepherd (fexecve)",
    "execve": "every hook",
    "kill": "the agent",
}


def test_the_system_call_filter_lets_hooks_switch_users_chown_and_nice() -> None:
    allowed = allowed_syscalls()
    missing = {name: who for name, who in HOOK_SYSCALLS.items() if name not in allowed}
    assert missing == {}


def test_a_refused_system_call_fails_with_eperm_and_never_kills() -> None:
    assert unit_settings("SystemCallErrorNumber") == ["EPERM"]
    allowed = allowed_syscalls()
    for refused in ("mount", "reboot", "init_module", "swapon", "settimeofday", "ptrace"):
        assert refused not in allowed, refused


def test_the_capabilities_let_hooks_switch_users() -> None:
    (bounding,) = unit_settings("CapabilityBoundingSet")
    assert {"CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_KILL"} <= set(bounding.split())
