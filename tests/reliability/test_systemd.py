"""The systemd units: valid for `systemd-analyze verify`, sandboxed to an exposure of 1.5 or lower.

Both checks run offline (no systemd needs to be running). `verify` insists that ExecStart's
program exists, and the units name the installed path (/opt/choysez-auditd/venv/bin/...), so the
tests verify a copy whose ExecStart names the command installed in this checkout's venv.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import COMMAND, ROOT

UNITS = ROOT / "systemd"
MAIN = UNITS / "choysez-auditd.service"
CAPTURE = UNITS / "choysez-auditd-capture.service"
INSTALLED = "/opt/choysez-auditd/venv/bin/choysez-auditd"
MAX_EXPOSURE = 1.5

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)"
)


def settings(unit: Path) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file, in order, per key."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def checkable_copy(unit: Path, folder: Path, text: str | None = None) -> Path:
    """The unit with ExecStart naming the command of this checkout (verify needs it to exist)."""
    dest = folder / unit.name
    dest.write_text((text if text is not None else unit.read_text()).replace(INSTALLED, str(COMMAND)))
    return dest


def analyze(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def exposure(unit: Path) -> float:
    proc = analyze("security", "--offline=true", "--no-pager", unit)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert found, f"no exposure level in:\n{proc.stdout}\n{proc.stderr}"
    return float(found.group(1))


class TestVerify:
    """`systemd-analyze verify` accepts both units, and would say so if one were broken."""

    @needs_analyze
    @pytest.mark.parametrize("unit", [MAIN, CAPTURE], ids=lambda u: u.name)
    def test_unit_passes_verify(self, unit: Path, tmp_path: Path) -> None:
        proc = analyze("verify", checkable_copy(unit, tmp_path))
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.strip() == "", proc.stderr  # not even a warning

    @needs_analyze
    def test_verify_catches_a_broken_unit(self, tmp_path: Path) -> None:
        broken = MAIN.read_text().replace("ProtectSystem=strict", "ProtectSystem=strikt")
        proc = analyze("verify", checkable_copy(MAIN, tmp_path, broken))
        assert "strikt" in proc.stderr  # verify exits 0 on such a line: hence the empty-stderr check

    @needs_analyze
    def test_verify_rejects_the_installed_path_when_absent(self, tmp_path: Path) -> None:
        """Why the copies above are needed: the real unit names a program only install.sh creates."""
        if Path(INSTALLED).exists():
            pytest.skip(f"{INSTALLED} is installed on this machine")
        dest = tmp_path / MAIN.name
        shutil.copy(MAIN, dest)
        proc = analyze("verify", dest)
        assert proc.returncode != 0
        assert "is not executable" in proc.stderr


class TestSandbox:
    """The main unit is sandboxed; only the capture unit holds a capability, and only CAP_NET_RAW."""

    @needs_analyze
    def test_main_unit_exposure_is_at_most_1_5(self, tmp_path: Path) -> None:
        level = exposure(checkable_copy(MAIN, tmp_path))
        print(f"systemd-analyze security: {MAIN.name} {level}")
        assert level <= MAX_EXPOSURE

    @needs_analyze
    def test_capture_unit_exposure(self, tmp_path: Path) -> None:
        level = exposure(checkable_copy(CAPTURE, tmp_path))
        print(f"systemd-analyze security: {CAPTURE.name} {level}")
        assert level <= MAX_EXPOSURE

    @needs_analyze
    def test_the_score_would_catch_a_loosened_sandbox(self, tmp_path: Path) -> None:
        loose = "\n".join(
            line
            for line in MAIN.read_text().splitlines()
            if not line.startswith(("Protect", "Private", "SystemCall", "Restrict", "Capability"))
        )
        assert exposure(checkable_copy(MAIN, tmp_path, loose)) > MAX_EXPOSURE

    def test_main_unit_has_the_service_contract(self) -> None:
        s = settings(MAIN)
        assert s["Type"] == ["notify"]
        assert s["ExecStart"][0].split()[:2] == [INSTALLED, "run"]
        assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
        assert s["Restart"] == ["on-failure"]
        assert s["WatchdogSec"] and s["TimeoutStopSec"]
        assert s["DynamicUser"] == ["yes"]
        assert s["StateDirectory"] == ["choysez-auditd"]
        assert s["ConfigurationDirectory"] == ["choysez-auditd"]
        assert s["CapabilityBoundingSet"] == [""]
        assert s["NoNewPrivileges"] == ["yes"]
        assert s["ProtectSystem"] == ["strict"]
        assert s["SystemCallFilter"][0] == "@system-service"
        assert set(s["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
        assert "PrivateNetwork" not in s  # it must reach the mail and SMTP servers

    def test_every_secret_in_the_example_config_is_a_credential(self) -> None:
        """Each `*_file` secret (commented examples too) can reach the daemon via LoadCredential=."""
        example = (ROOT / "deploy" / "config.example.toml").read_text()
        secrets = set(re.findall(r"^#?\s*(?!\w*ca_file)\w+_file\s*=\s*\"([^\"]+)\"", example, re.MULTILINE))
        assert "imap-password" in secrets and "smtp-password" in secrets
        credentials = {v.split(":")[0] for v in settings(MAIN)["LoadCredential"]}
        assert secrets <= credentials, f"secrets without LoadCredential=: {secrets - credentials}"

    def test_capture_unit_holds_only_cap_net_raw(self) -> None:
        s = settings(CAPTURE)
        assert s["CapabilityBoundingSet"] == ["CAP_NET_RAW"]
        assert s["AmbientCapabilities"] == ["CAP_NET_RAW"]
        assert "AF_PACKET" in s["RestrictAddressFamilies"][0]
        assert s["User"] == settings(MAIN)["User"]  # the same user: both write the same store
        assert s["NoNewPrivileges"] == ["yes"]

    def test_no_unit_is_called_auditd(self) -> None:
        """auditd.service is the Linux Audit daemon's; ours must never shadow it."""
        assert sorted(p.name for p in UNITS.glob("*.service")) == [
            "choysez-auditd-capture.service",
            "choysez-auditd.service",
        ]
