"""Faults injected into the store: a full disk, an old schema, a newer schema, SIGKILL mid-scan.

What must hold each time: nothing already stored is lost or corrupted (`PRAGMA integrity_check`
is ok, counts unchanged), and a re-run ends exactly where one clean run would, nothing doubled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from auditd.store import MIGRATIONS, SCHEMA_VERSION
from tests.conftest import COMMAND, Run

COPIES = 200  # x 9 sample messages = 1,800 messages, four commit batches


def make_maildir(school: Path, copies: int) -> int:
    """The sample Maildir, each message repeated `copies` times under a new Message-ID."""
    cur = school / "mail" / "cur"
    originals = [(p.name, p.read_bytes()) for p in sorted(cur.iterdir())]
    n = 0
    for i in range(copies):
        for j, (_, raw) in enumerate(originals):
            body = re.sub(rb"(?im)^Message-ID: <", b"Message-ID: <copy%d." % i, raw, count=1)
            (cur / f"{1763300000 + i}.M{j}P{i}.gen:2,S").write_bytes(body)
            n += 1
    return n + len(originals)


def db_state(path: Path) -> tuple[str, int, int]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        findings = conn.execute("SELECT count(*) FROM findings").fetchone()[0]
        evidence = conn.execute("SELECT count(*) FROM evidence").fetchone()[0]
    return str(check), int(findings), int(evidence)


def summary(cli: Run, config: Path) -> list[tuple[object, ...]]:
    """The findings as a comparable list: everything except ids and record times."""
    proc = cli("findings", "--config", config, "--format", "json", check=True)
    return sorted(
        (
            f["rule"],
            json.dumps(f["subject"], sort_keys=True),
            f["first_seen"],
            f["last_seen"],
            f["occurrences"],
            f["status"],
            len(f["evidence"]),
        )
        for f in json.loads(proc.stdout)
    )


@pytest.fixture
def small_disk(school: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs holding the store (needs root and mount; skipped otherwise)."""
    disk = school / "disk"
    disk.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for the full-disk test: {proc.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave_kib: int) -> Path:
    """Fill the filesystem but for about `leave_kib` KiB."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, free - leave_kib * 1024))
    return filler


class TestFullDisk:
    """The store's disk fills up during a scan: the scan fails, what was stored survives intact."""

    def _scan_on_full_disk(
        self, cli: Run, school: Path, disk: Path, leave_kib: int
    ) -> tuple[subprocess.CompletedProcess[str], tuple[str, int, int], tuple[str, int, int]]:
        config = school / "config.toml"
        text = config.read_text().replace('path = "auditd.db"', 'path = "disk/auditd.db"')
        config.write_text(text)
        cli("scan", "mail", "--config", config, check=True)
        before = db_state(disk / "auditd.db")
        assert before[1] > 0
        make_maildir(school, COPIES)
        filler = fill(disk, leave_kib)
        proc = cli("scan", "mail", "--config", config)
        filler.unlink()
        after = db_state(disk / "auditd.db")
        return proc, before, after

    @pytest.mark.parametrize("leave_kib", [0, 60, 200], ids=lambda k: f"{k}KiB-free")
    def test_nothing_stored_is_lost_or_corrupted(
        self, cli: Run, school: Path, small_disk: Path, leave_kib: int
    ) -> None:
        proc, before, after = self._scan_on_full_disk(cli, school, small_disk, leave_kib)
        assert proc.returncode != 0, proc.stdout
        assert after[0] == "ok"
        assert after[1:] == before[1:]
        # and once there is room again, the same scan completes
        cli("scan", "mail", "--config", school / "config.toml", check=True)
        assert db_state(small_disk / "auditd.db")[1] > before[1]

    def test_scan_reports_one_clear_line(self, cli: Run, school: Path, small_disk: Path) -> None:
        proc, _, _ = self._scan_on_full_disk(cli, school, small_disk, 60)
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr
        assert "full" in proc.stderr and "auditd.db" in proc.stderr


def v1_store(path: Path) -> None:
    """A store as version 1 of the schema left it, with one finding in it."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(MIGRATIONS[0])
        when = "2026-11-20T10:00:00.000000+00:00"
        conn.execute(
            "INSERT INTO findings (fingerprint, rule, clauses, severity, status, staff, address, "
            "first_seen, last_seen, occurrences, pupil_involved, reasons, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, 0, '[]', ?, ?)",
            (
                "fp-old",
                "MAIL-PERSONAL-SENDER",
                '["SMP-1.5"]',
                "medium",
                "open",
                "jane.smith@choysez.org.uk",
                "jane.smith77@gmail.com",
                when,
                when,
                when,
                when,
            ),
        )
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    path.chmod(0o600)


class TestSchemaVersions:
    """Upgrades migrate an older store after a backup; a newer store is refused untouched."""

    def test_v1_store_migrates_with_a_backup(self, cli: Run, school: Path) -> None:
        if SCHEMA_VERSION < 2:
            pytest.skip("there is no older released schema yet")
        db = school / "auditd.db"
        v1_store(db)
        proc = cli("store", "migrate", "--config", school / "config.toml", check=True)
        assert f"schema v{SCHEMA_VERSION}" in proc.stdout
        backup = school / "auditd.db.v1.bak"
        assert backup.exists()
        assert stat.S_IMODE(backup.stat().st_mode) == 0o600
        with contextlib.closing(sqlite3.connect(backup)) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
            assert conn.execute("SELECT fingerprint FROM findings").fetchall() == [("fp-old",)]
        assert db_state(db) == ("ok", 1, 0)
        found = json.loads(cli("findings", "--config", school / "config.toml", "--format", "json").stdout)
        assert [f["subject"]["address"] for f in found] == ["jane.smith77@gmail.com"]

    def test_empty_v0_file_becomes_a_store(self, cli: Run, school: Path) -> None:
        db = school / "auditd.db"
        db.touch(mode=0o600)
        cli("store", "migrate", "--config", school / "config.toml", check=True)
        with contextlib.closing(sqlite3.connect(db)) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION

    def test_newer_store_is_refused_and_left_alone(self, cli: Run, school: Path) -> None:
        db = school / "auditd.db"
        cli("store", "migrate", "--config", school / "config.toml", check=True)
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
            conn.commit()
        before = db.read_bytes()
        proc = cli("findings", "--config", school / "config.toml")
        assert proc.returncode == 1
        assert "newer than this choysez-auditd knows" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert db.read_bytes() == before

    def test_not_a_store_is_a_clear_error(self, cli: Run, school: Path) -> None:
        (school / "auditd.db").write_bytes(b"this is not sqlite" * 100)
        proc = cli("findings", "--config", school / "config.toml")
        assert proc.returncode == 1
        assert "auditd.db" in proc.stderr and "Traceback" not in proc.stderr


class TestKilledScan:
    """SIGKILL in the middle of a scan, then a re-run: the same findings as one clean run."""

    def test_rerun_after_sigkill_equals_a_clean_run(self, cli: Run, school: Path, tmp_path: Path) -> None:
        messages = make_maildir(school, COPIES)
        clean = tmp_path / "clean"
        shutil.copytree(school, clean)
        cli("scan", "mail", "--config", clean / "config.toml", check=True)
        expected = summary(cli, clean / "config.toml")
        assert len(expected) > COPIES

        config = school / "config.toml"
        db = school / "auditd.db"
        proc = subprocess.Popen(
            [str(COMMAND), "scan", "mail", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        killed_at = -1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                with (
                    contextlib.suppress(sqlite3.Error),
                    contextlib.closing(sqlite3.connect(db, timeout=1)) as c,
                ):
                    n = c.execute("SELECT count(*) FROM findings").fetchone()[0]
                    if n > 0:
                        proc.send_signal(signal.SIGKILL)
                        killed_at = n
                        break
            time.sleep(0.01)
        proc.wait(timeout=30)
        if killed_at < 0:
            pytest.fail("the scan finished before it could be killed: make the Maildir bigger")
        assert proc.returncode == -signal.SIGKILL
        assert 0 < killed_at < len(expected), "killed mid-way, after a batch was committed"
        assert db_state(db)[0] == "ok"

        cli("scan", "mail", "--config", config, check=True)
        assert summary(cli, config) == expected
        again = cli("scan", "mail", "--config", config, check=True)
        assert " 0 new findings" in again.stdout
        print(f"faults: SIGKILL after {killed_at} of {len(expected)} findings ({messages} messages)")
