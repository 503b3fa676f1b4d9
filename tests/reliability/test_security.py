"""Hostile input and secrets: the digest and the CSV export defuse what came from mail or traffic;
files are created private; a secret never appears in any output.
"""

from __future__ import annotations

import csv
import email
import email.policy
import io
import os
import socket
import stat
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from auditd.cli import csv_cell
from auditd.digest.render import DigestData, render_html, render_text
from auditd.model import Evidence, Finding, Severity, Status, StoredFinding, Subject
from auditd.store import Store
from tests.conftest import Run

NOW = datetime(2026, 11, 24, 7, 0, tzinfo=UTC)
HOSTILE_SUBJECTS = [
    '<script>alert("x")</script>',
    '"><img src=x onerror=alert(1)>',
    "Homework\r\nBcc: everyone@example.net",
    "Trip\nX-Injected: yes\n\n<b>body</b>",
    "=cmd|' /C calc'!A0",
    "\u202eevil\u202c <iframe src=//x>",
]
FORMULAS = ["=1+1", "+SUM(A1:A9)", "-2+3", "@SUM(A1)", '=HYPERLINK("http://x","y")']


def finding(
    i: int, subject: str, *, room: str | None = None, reason: str = "mentions pupil"
) -> StoredFinding:
    mail = room is None
    return StoredFinding(
        id=i,
        rule="MAIL-PERSONAL-SENDER" if mail else "NET-STREAMING-IN-CLASS",
        clauses=("SMP-1.5",) if mail else ("SMP-1.10",),
        severity=Severity.MEDIUM,
        status=Status.OPEN,
        subject=Subject(staff=f"<b>{subject}</b>@choysez.org.uk", address="a@gmail.com")
        if mail
        else Subject(room=room, device="10.20.12.7", service=subject),
        fingerprint=f"fp{i}",
        first_seen=NOW,
        last_seen=NOW,
        occurrences=1,
        pupil_involved=True,
        approval_id=None,
        reasons=(reason, subject),
        created_at=NOW,
        evidence=(Evidence(f"m{i}", NOW, {"subject": subject, "period": subject, "lesson_date": "x"}),),
    )


def digest(findings: list[StoredFinding], organisation: str = "Choysez") -> DigestData:
    return DigestData(
        organisation=organisation,
        day=date(2026, 11, 24),
        generated_at=NOW,
        new=findings,
        still_open=[],
        approvals=[],
        health=[],
        clauses={"SMP-1.5": "official account", "SMP-1.10": "no Netflix"},
        rule_titles={},
    )


def hostile_findings() -> list[StoredFinding]:
    out = [finding(i, s) for i, s in enumerate(HOSTILE_SUBJECTS)]
    out += [finding(100 + i, s, room=f"Room <{s}>") for i, s in enumerate(HOSTILE_SUBJECTS)]
    return out


class TestDigestWithHostileInput:
    """Subjects, names, rooms and services from mail or traffic never become markup or headers."""

    def test_html_has_no_markup_from_input(self) -> None:
        html = render_html(digest(hostile_findings()))
        for bad in ("<script", "<img", "<iframe", "<b>body", "onerror=alert(1)>"):
            assert bad not in html, bad
        assert "&lt;script&gt;" in html

    def test_text_has_no_line_made_by_input(self) -> None:
        text = render_text(digest(hostile_findings()))
        lines = text.splitlines()
        assert not any(line.startswith(("Bcc:", "X-Injected:")) for line in lines)
        assert "\r" not in text

    def test_composed_message_has_only_its_own_headers(self) -> None:
        send = pytest.importorskip("auditd.digest.send")
        msg = send.compose(
            digest(hostile_findings()),
            sender="choysez-auditd@choysez.org.uk",
            recipient="ict.manager@choysez.org.uk",
            msgid="<t@choysez.org.uk>",
            now=NOW,
        )
        parsed = email.message_from_bytes(bytes(msg), policy=email.policy.default)
        names = {k.lower() for k in parsed}
        assert "bcc" not in names and "x-injected" not in names
        assert names <= {
            "subject",
            "from",
            "to",
            "date",
            "message-id",
            "auto-submitted",
            "mime-version",
            "content-type",
            "content-transfer-encoding",
        }
        for part in parsed.walk():
            if part.get_content_type() == "text/html":
                assert "<script" not in part.get_content()

    def test_hostile_organisation_name_cannot_inject_a_header(self) -> None:
        send = pytest.importorskip("auditd.digest.send")
        data = digest([], organisation="Choysez\r\nBcc: all@example.net")
        msg = send.compose(
            data, sender="a@choysez.org.uk", recipient="b@choysez.org.uk", msgid="<x@y>", now=NOW
        )
        parsed = email.message_from_bytes(bytes(msg), policy=email.policy.default)
        assert parsed["Bcc"] is None
        assert "\n" not in str(parsed["Subject"])


class TestCsvExport:
    """`findings --format csv` never hands a spreadsheet a formula."""

    @pytest.mark.parametrize("value", [*FORMULAS, "\tx", "\rx"])
    def test_csv_cell_defuses(self, value: str) -> None:
        assert csv_cell(value).startswith("'")

    def test_plain_values_are_untouched(self) -> None:
        assert csv_cell("Room 12") == "Room 12" and csv_cell(3) == "3" and csv_cell(None) == ""

    def test_export_of_hostile_findings(self, cli: Run, school: Path) -> None:
        with Store.open(school / "auditd.db") as store:
            store.record_findings(
                [
                    Finding(
                        rule="NET-STREAMING-IN-CLASS",
                        clauses=("SMP-1.10",),
                        severity=Severity.LOW,
                        subject=Subject(room=f, device="10.20.12.9", service=f),
                        fingerprint=f"hostile-{i}",
                        first_seen=NOW,
                        last_seen=NOW,
                        pupil_involved=False,
                        evidence=(Evidence(f"s{i}", NOW, {"period": f}),),
                        reasons=(f,),
                    )
                    for i, f in enumerate(FORMULAS)
                ],
                now=NOW,
            )
        proc = cli("findings", "--config", school / "config.toml", "--format", "csv", check=True)
        rows = list(csv.DictReader(io.StringIO(proc.stdout)))
        assert len(rows) == len(FORMULAS)
        for row in rows:
            for key, cell in row.items():
                assert not cell.startswith(("=", "+", "-", "@")), (key, cell)
        assert any(row["reasons"] == "'=1+1" for row in rows)


class TestFileModes:
    """The store, its WAL files and its backups are private to the daemon's user."""

    def test_store_wal_and_backup_are_0600(self, cli: Run, school: Path) -> None:
        old = os.umask(0o022)
        try:
            with Store.open(school / "auditd.db") as store:
                store.backup(school / "copy.db")
                files = [school / "auditd.db", *school.glob("auditd.db-*"), school / "copy.db"]
                assert len(files) >= 3  # -wal and -shm exist while open
                for f in files:
                    assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        finally:
            os.umask(old)
        cli("store", "backup", school / "cli-copy.db", "--config", school / "config.toml", check=True)
        assert stat.S_IMODE((school / "cli-copy.db").stat().st_mode) == 0o600


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestSecretsStayOut:
    """A secret read for a source that fails never appears in any output, log or record."""

    SECRET = "Sup3r-S3cret-pa55word-7f1c"

    def test_failing_imap_source_does_not_leak_its_password(self, cli: Run, school: Path) -> None:
        (school / "imap-password").write_text(self.SECRET + "\n")
        config = school / "config.toml"
        config.write_text(
            config.read_text().replace(
                "[[network.sources]]",
                f"""[[mail.sources]]
name = "staff-imap"
type = "imap"
host = "127.0.0.1"
port = {closed_port()}
tls = false
username = "audit"
password_file = "imap-password"

[[network.sources]]""",
                1,
            )
        )
        outputs = []
        for args in (
            ("scan", "mail"),
            ("scan", "mail", "--source", "staff-imap"),
            ("check",),
            ("digest", "--format", "html"),
            ("digest", "--format", "text"),
        ):
            proc = cli(*args, "--config", config)
            outputs.append(proc.stdout + proc.stderr)
        assert "staff-imap" in outputs[1]  # the failure is reported, by name
        assert any("FAILED" in o or "failed" in o for o in outputs[:2])
        for out in outputs:
            assert self.SECRET not in out
        stored = b"".join(p.read_bytes() for p in school.glob("auditd.db*"))
        assert self.SECRET.encode() not in stored
