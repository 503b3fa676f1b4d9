"""Dovecot killed in the middle of a scan, then started again: no finding lost, none doubled."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import COMMAND, SAMPLE, Run
from tests.mail.dovecot import Dovecot, available

JANE = SAMPLE / "mail" / "cur" / "1763384511.M101P2001.mail1.choysez.org.uk:2,S"
MESSAGES = 6000
BUSINESS_EVERY = 3  # every third message is Jane writing to a parent from her personal address


def fill(server: Dovecot) -> int:
    """Write the mailbox straight into Dovecot's Maildir; returns how many findings it should give."""
    jane = JANE.read_bytes()
    other = (
        b"From: Newsletter <news@example.org>\r\nTo: office@choysez.org.uk\r\nSubject: Weekly news\r\n"
        b"Date: Mon, 23 Nov 2026 08:00:00 +0000\r\nMessage-ID: <news-%d@example.org>\r\n\r\nHello.\r\n"
    )
    for sub in ("cur", "new", "tmp"):
        (server.maildir / sub).mkdir(parents=True, exist_ok=True)
    expected = 0
    for i in range(MESSAGES):
        if i % BUSINESS_EVERY == 0:
            raw = jane.replace(b"<CAJ7x0vQ1m3sample001@mail.gmail.com>", b"<fault-%d@mail.gmail.com>" % i)
            expected += 1
        else:
            raw = other % i
        (server.maildir / "cur" / f"{1795000000 + i}.M{i}P1.fault:2,S").write_bytes(raw)
    server.chown_mail()
    return expected


def checkpoints(db: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return int(
                conn.execute("SELECT count(*) FROM checkpoints WHERE source = 'staff-imap'").fetchone()[0]
            )
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def mail_findings(db: Path) -> list[tuple[str, int]]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT fingerprint, occurrences FROM findings "
            "WHERE rule = 'MAIL-PERSONAL-SENDER' ORDER BY fingerprint"
        )
        return [(fp, n) for fp, n in rows]
    finally:
        conn.close()


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (Dovecot's imap processes outlive their master)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    doomed, todo = [], [pid]
    while todo:
        p = todo.pop()
        doomed.append(p)
        todo += children.get(p, [])
    for p in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


@pytest.mark.skipif(not available(), reason="Dovecot is not installed (Debian package dovecot-imapd)")
class TestDovecotStoppedMidScan:
    """The server dies mid-scan: the source fails in one line; after a restart the scan completes."""

    def test_no_finding_lost_or_doubled(self, school: Path, cli: Run) -> None:
        server = Dovecot().start()
        try:
            expected = fill(server)
            (school / "imap-password").write_text(server.password + "\n")
            config = school / "config.toml"
            text = config.read_text()
            config.write_text(
                text[: text.index("[[mail.sources]]")]
                + f"""[[mail.sources]]
name = "staff-imap"
type = "imap"
host = "127.0.0.1"
port = {server.port}
tls = false
username = "{server.user}"
password_file = "imap-password"
folders = ["INBOX"]

"""
                + text[text.index("[[network.sources]]") :]
            )
            db = school / "auditd.db"
            scan = subprocess.Popen(
                [str(COMMAND), "scan", "mail", "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 60
            while checkpoints(db) == 0 and scan.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.process is not None
            kill_tree(server.process.pid)  # Dovecot dies, sessions and all, with the scan half done
            server.process.wait(timeout=10)
            out, err = scan.communicate(timeout=120)
            assert scan.returncode == 1, (out, err)
            assert "staff-imap: FAILED" in err and "Traceback" not in err
            partial = mail_findings(db)
            assert 0 < len(partial) < expected  # what was committed before the fault stays

            for _ in range(50):  # the old listener may take a moment to go
                try:
                    server.start()
                    break
                except RuntimeError:
                    time.sleep(0.2)
            cli("scan", "mail", "--config", config, check=True)
            again = cli("scan", "mail", "--config", config, check=True)
            assert "staff-imap: 0 items read" in again.stdout
        finally:
            server.stop(fast=True)
        found = mail_findings(db)
        assert len(found) == expected
        assert all(n == 1 for _, n in found)
        assert set(partial) <= set(found)
