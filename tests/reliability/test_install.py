"""deploy/install.sh stages a complete install into a temporary root, without root, and upgrades it
in place without touching an edited config.

The full install (venv, pinned dependencies, `check --offline`) runs once (about 20 s with pip's
cache warm: it downloads the pinned wheels otherwise); the layout checks use `--no-deps`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLE

INSTALL = ROOT / "deploy" / "install.sh"
PREFIX = "opt/choysez-auditd"


def install(
    *args: str | Path, user: str | None = None, home: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PIP_REQUIRE"))}
    env.pop("DESTDIR", None)
    if home is not None:
        env["HOME"] = str(home)
    cmd = [str(INSTALL), *map(str, args)]
    if user is not None:
        pw = pwd.getpwnam(user)
        cmd = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def full_root() -> Iterator[Path]:
    """One full install (with dependencies) into a temporary root, shared by the tests below."""
    with tempfile.TemporaryDirectory(prefix="choysez-install-") as tmp:
        root = Path(tmp) / "root"
        proc = install("--destdir", root)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "check --offline: ok" in proc.stdout
        yield root


class TestStagedInstall:
    """A DESTDIR install: everything lands under the root; nothing outside it changes."""

    def test_layout_modes_and_units(self, full_root: Path) -> None:
        etc = full_root / "etc" / "choysez-auditd"
        assert {p.name for p in etc.iterdir()} == {"config.toml", "staff.csv", "community.csv"}
        assert mode(etc) == 0o750
        for f in etc.iterdir():
            assert mode(f) == 0o640, f  # staff.csv holds personal addresses
        assert mode(full_root / "etc" / "credstore") == 0o700
        units = full_root / "etc" / "systemd" / "system"
        assert (units / "choysez-auditd.service").read_text() == (
            ROOT / "systemd" / "choysez-auditd.service"
        ).read_text()
        assert (units / "choysez-auditd-capture.service").exists()
        assert (full_root / PREFIX / "share" / "README.md").exists()
        assert mode(full_root / "etc") == 0o755  # folders it only passes through keep normal modes

    def test_config_keeps_the_store_in_the_state_folder(self, full_root: Path) -> None:
        text = (full_root / "etc" / "choysez-auditd" / "config.toml").read_text()
        assert 'path = "/var/lib/choysez-auditd/auditd.db"' in text

    def test_installed_command_names_its_final_interpreter_and_runs(self, full_root: Path) -> None:
        venv = full_root / PREFIX / "venv"
        script = (venv / "bin" / "choysez-auditd").read_text().splitlines()[0]
        assert script == "#!/opt/choysez-auditd/venv/bin/python"
        proc = subprocess.run(
            [
                venv / "bin" / "python",
                "-m",
                "auditd",
                "check",
                "--offline",
                "--config",
                full_root / "etc" / "choysez-auditd" / "config.toml",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert "config:" in proc.stdout and "directory:" in proc.stdout

    def test_capture_reader_and_log_scanners_are_compiled(self, full_root: Path) -> None:
        """Where the machine can compile (as here), the installed program runs the mypyc-compiled modules,
        and reads what this checkout reads."""
        if not (shutil.which("cc") and Path(sysconfig.get_paths()["include"], "Python.h").exists()):
            pytest.skip("no C compiler or Python headers: install.sh installs plain Python (and says so)")
        python = full_root / PREFIX / "venv" / "bin" / "python"
        code = "import auditd.sources.pcap as p, auditd.sources.logscan as s; print(p.__file__, s.__file__)"
        proc = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, check=True)
        modules = proc.stdout.split()
        assert len(modules) == 2 and all(m.startswith(str(full_root)) and m.endswith(".so") for m in modules)
        inputs = [SAMPLE / "captures" / "sample.pcap", ROOT / "tests/data/logs/squid/access.log"]
        outputs = []
        for cmd in ([python, "-I"], [sys.executable]):
            run = subprocess.run(
                [*cmd, "-m", "auditd", "inspect", "--format", "jsonl", *inputs],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
                cwd=full_root,
                env={**os.environ, "CHOYSEZ_AUDITD_CONFIG": str(full_root / "no-such-config.toml")},
            )
            outputs.append(run.stdout)
        assert outputs[0] == outputs[1] and outputs[0].count("\n") >= 10

    def test_rerun_upgrades_and_never_overwrites_an_edited_config(self, full_root: Path) -> None:
        config = full_root / "etc" / "choysez-auditd" / "config.toml"
        edited = config.read_text().replace('name = "Choysez"', 'name = "Choysez North"', 1)
        assert edited != config.read_text()
        config.write_text(edited)
        staff = full_root / "etc" / "choysez-auditd" / "staff.csv"
        before = staff.read_bytes()
        proc = install("--destdir", full_root, "--no-deps")
        assert proc.returncode == 0, proc.stderr
        assert "upgrading the venv" in proc.stdout
        site = next((full_root / PREFIX / "venv" / "lib").glob("python3*/site-packages/auditd"))
        assert not list(site.rglob("*.so"))  # an uncompiled upgrade leaves no stale compiled module
        assert config.read_text() == edited
        assert (config.parent / "config.toml.dist").exists()
        assert staff.read_bytes() == before
        assert not (config.parent / "staff.csv.dist").exists()  # unchanged files leave no .dist


class TestNoRootNeeded:
    """Staging needs no root, and the script refuses to install into the system without it."""

    @pytest.fixture
    def world_tmp(self) -> Iterator[Path]:
        tmp = Path(tempfile.mkdtemp(prefix="choysez-install-nobody-"))
        tmp.chmod(0o777)
        yield tmp
        shutil.rmtree(tmp, ignore_errors=True)

    def _nobody(self) -> str:
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            pytest.skip("needs root and setpriv to run the script as another user")
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("no user nobody")
        return "nobody"

    def test_unprivileged_user_can_stage(self, world_tmp: Path) -> None:
        user = self._nobody()
        real_etc = Path("/etc/choysez-auditd").exists()
        proc = install("--destdir", world_tmp / "root", "--no-deps", user=user, home=world_tmp)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "no user created, systemd not touched" in proc.stdout
        assert (world_tmp / "root" / "etc" / "choysez-auditd" / "config.toml").stat().st_uid != 0
        assert Path("/etc/choysez-auditd").exists() == real_etc

    def test_unprivileged_user_cannot_install_into_the_system(self, world_tmp: Path) -> None:
        user = self._nobody()
        proc = install(user=user, home=world_tmp)
        assert proc.returncode == 2
        assert "needs root" in proc.stderr

    def test_relative_prefix_is_refused(self, tmp_path: Path) -> None:
        proc = install("--destdir", tmp_path, "--prefix", "opt/x")
        assert proc.returncode == 2
        assert "absolute" in proc.stderr
        assert not (tmp_path / "opt").exists()


class TestPrefix:
    """--prefix and --sysconfdir move the program and the config, and the units follow."""

    def test_units_name_the_chosen_paths(self, tmp_path: Path) -> None:
        proc = install(
            "--destdir", tmp_path, "--no-deps", "--prefix", "/srv/cza", "--sysconfdir", "/srv/cza/etc"
        )
        assert proc.returncode == 0, proc.stderr
        unit = (tmp_path / "etc" / "systemd" / "system" / "choysez-auditd.service").read_text()
        assert "ExecStart=/srv/cza/venv/bin/choysez-auditd run --config /srv/cza/etc/config.toml" in unit
        assert "/opt/choysez-auditd/venv" not in unit
        assert (tmp_path / "srv" / "cza" / "etc" / "config.toml").exists()
        assert (tmp_path / "srv" / "cza" / "venv" / "bin" / "choysez-auditd").exists()
