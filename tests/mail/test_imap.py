"""The IMAP source against a real Dovecot: read-only, incremental, frugal, and clear when it fails."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from imapclient.exceptions import IMAPClientError

from auditd.config import ImapSource
from auditd.errors import SourceError
from auditd.model import MailMessage
from auditd.sources.imap import Meter, Tuning, new_uids, parse_fetch, parse_structure, probe_imap, read_imap
from auditd.sources.mailfile import MailStats, parse_message
from tests.conftest import SAMPLE, Run
from tests.mail.dovecot import Dovecot, free_port

FAST = Tuning(batch=3, backoff=0.05, connect_timeout=5, read_timeout=10)


def make_source(server: Dovecot, base: Path, **overrides: Any) -> ImapSource:
    (base / "imap-password").write_text(server.password + "\n")
    fields: dict[str, Any] = {
        "name": "staff-imap",
        "type": "imap",
        "host": server.host,
        "port": server.port,
        "tls": False,
        "username": server.user,
        "password_file": "imap-password",
        "folders": ["INBOX"],
    }
    fields.update(overrides)
    return ImapSource.model_validate(fields)


class Scan:
    """Runs passes like the pipeline does: checkpoints carried from one pass to the next."""

    def __init__(self, src: ImapSource, base: Path, tuning: Tuning = FAST) -> None:
        self.src, self.base, self.tuning = src, base, tuning
        self.checkpoints: dict[str, str] = {}

    def run(self) -> tuple[list[MailMessage], MailStats, Meter]:
        stats, meter = MailStats(), Meter()
        out = []
        for msg, update in read_imap(
            self.src,
            base=self.base,
            previous=dict(self.checkpoints),
            stats=stats,
            tuning=self.tuning,
            meter=meter,
        ):
            out.append(msg)
            self.checkpoints.update(update)
        return out, stats, meter


def message(n: int, *, sender: str = "parent@example.net", body: str | None = None) -> bytes:
    m = EmailMessage()
    m["From"] = sender
    m["To"] = "jane.smith@choysez.org.uk"
    m["Subject"] = f"Message {n}"
    m["Message-ID"] = f"<m{n}@example.net>"
    m["Date"] = "Fri, 20 Nov 2026 16:02:11 +0000"
    m.set_content(body or f"Hello, this is message {n} about the school trip.")
    return m.as_bytes()


def flags(server: Dovecot, folder: str = "INBOX") -> dict[int, set[bytes]]:
    c = server.client()
    try:
        c.select_folder(folder, readonly=True)
        return {uid: set(d[b"FLAGS"]) for uid, d in c.fetch(c.search(["ALL"]), ["FLAGS"]).items()}
    finally:
        c.logout()


def append(server: Dovecot, *raws: bytes, folder: str = "INBOX", seen: bool = False) -> None:
    c = server.client()
    try:
        if not c.folder_exists(folder):
            c.create_folder(folder)
        for raw in raws:
            c.append(folder, raw, flags=[b"\\Seen"] if seen else [])
    finally:
        c.logout()


class TestReadOnly:
    """Scanning never changes what the mailbox's owner sees."""

    def test_flags_are_identical_before_and_after_a_scan(self, dovecot: Dovecot, tmp_path: Path) -> None:
        c = dovecot.client()
        c.append("INBOX", message(1), flags=[b"\\Seen"])
        c.append("INBOX", message(2), flags=[])
        c.append("INBOX", message(3), flags=[b"\\Flagged", b"\\Answered"])
        c.logout()
        before = flags(dovecot)
        assert b"\\Seen" not in before[2]  # the premise: an unread message

        messages, _, _ = Scan(make_source(dovecot, tmp_path), tmp_path).run()

        assert len(messages) == 3
        after = flags(dovecot)
        assert after == before
        assert b"\\Seen" not in after[2] and b"\\Seen" not in after[3]

    def test_the_server_confirms_each_folder_was_opened_read_only(
        self, dovecot: Dovecot, tmp_path: Path
    ) -> None:
        append(dovecot, message(1))
        append(dovecot, message(2), folder="Sent")
        _, _, meter = Scan(make_source(dovecot, tmp_path, folders=["INBOX", "Sent"]), tmp_path).run()
        assert meter.read_only == {"INBOX": True, "Sent": True}
        assert all(b"\\Seen" not in f for f in flags(dovecot).values())


class TestIncremental:
    """A second pass fetches only what is new; a recreated folder is read again from the start."""

    def test_a_second_scan_yields_nothing_and_fetches_nothing(self, dovecot: Dovecot, tmp_path: Path) -> None:
        append(dovecot, *(message(n) for n in range(7)))
        scan = Scan(make_source(dovecot, tmp_path), tmp_path)
        first, _, meter1 = scan.run()
        assert len(first) == 7 and meter1.fetches >= 3  # batches of 3
        assert scan.checkpoints["folder:INBOX"].endswith(":7")

        second, stats, meter2 = scan.run()
        assert second == [] and stats.messages == 0
        assert meter2.fetches == 0

    def test_new_mail_since_the_last_scan_is_found(self, dovecot: Dovecot, tmp_path: Path) -> None:
        append(dovecot, message(1), message(2))
        scan = Scan(make_source(dovecot, tmp_path), tmp_path)
        scan.run()
        append(dovecot, message(3), message(4))
        found, _, _ = scan.run()
        assert [m.subject for m in found] == ["Message 3", "Message 4"]

    def test_star_edge_case_the_highest_old_uid_is_not_read_again(
        self, dovecot: Dovecot, tmp_path: Path
    ) -> None:
        """`UID SEARCH UID n+1:*` answers with the highest UID even when it is <= n."""
        append(dovecot, message(1), message(2), message(3))
        scan = Scan(make_source(dovecot, tmp_path), tmp_path)
        scan.run()
        # a message arrives and is deleted: UIDNEXT moves on, but nothing is newer than UID 3
        append(dovecot, message(4))
        c = dovecot.client()
        c.select_folder("INBOX")
        c.delete_messages([4])
        c.expunge()
        c.logout()
        found, stats, _ = scan.run()
        assert found == [] and stats.messages == 0
        assert new_uids([3], 3) == [] and new_uids([5, 4, 2], 3) == [4, 5]

    def test_a_changed_uidvalidity_means_a_full_rescan(self, dovecot: Dovecot, tmp_path: Path) -> None:
        append(dovecot, message(1), message(2), folder="Sent")
        scan = Scan(make_source(dovecot, tmp_path, folders=["Sent"]), tmp_path)
        assert len(scan.run()[0]) == 2
        old = scan.checkpoints["folder:Sent"]

        c = dovecot.client()
        c.delete_folder("Sent")
        c.create_folder("Sent")
        c.append("Sent", message(11))
        c.append("Sent", message(12))
        c.logout()
        found, _, _ = scan.run()

        # the new messages have UIDs 1 and 2, which the old checkpoint says were read
        assert [m.subject for m in found] == ["Message 11", "Message 12"]
        new = scan.checkpoints["folder:Sent"]
        assert new.split(":")[0] != old.split(":")[0] and new.endswith(":2")

    def test_folders_are_checkpointed_separately(self, dovecot: Dovecot, tmp_path: Path) -> None:
        append(dovecot, message(1))
        append(dovecot, message(2), message(3), folder="Sent")
        scan = Scan(make_source(dovecot, tmp_path, folders=["INBOX", "Sent"]), tmp_path)
        found, _, _ = scan.run()
        assert [m.location.rsplit("/", 1)[1] for m in found] == ["INBOX;UID=1", "Sent;UID=1", "Sent;UID=2"]
        assert set(scan.checkpoints) == {"folder:INBOX", "folder:Sent"}
        assert found[0].location == f"imap://audit@127.0.0.1:{dovecot.port}/INBOX;UID=1"


def with_attachment(n: int, size: int) -> bytes:
    m = EmailMessage()
    m["From"] = "jane.smith77@gmail.com"
    m["To"] = "parent@example.net"
    m["Subject"] = f"Report {n}"
    m.set_content("Please find the consent form attached.")
    m.add_attachment(
        bytes(range(256)) * (size // 256), maintype="application", subtype="pdf", filename="f.pdf"
    )
    return m.as_bytes()


class TestFrugal:
    """Only headers, structure and text cross the wire; attachments never do."""

    def test_a_500_kb_attachment_is_not_downloaded(self, dovecot: Dovecot, tmp_path: Path) -> None:
        append(dovecot, with_attachment(1, 500_000), with_attachment(2, 500_000))
        sessions = len(dovecot.logged_out_bytes())
        found, _, meter = Scan(make_source(dovecot, tmp_path), tmp_path).run()

        assert [m.text.strip() for m in found] == ["Please find the consent form attached."] * 2
        assert meter.bytes < 5_000
        # what the server says it sent in that session, protocol and all
        deadline = time.monotonic() + 5
        while len(dovecot.logged_out_bytes()) == sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dovecot.logged_out_bytes()[-1] < 20_000

    def test_a_huge_text_part_is_cut_at_the_cap(self, dovecot: Dovecot, tmp_path: Path) -> None:
        append(dovecot, message(1, body="homework " * 70_000))  # 630 KB of text
        tuning = Tuning(part_cap=64 * 1024, backoff=0.05)
        found, _, meter = Scan(make_source(dovecot, tmp_path), tmp_path, tuning).run()
        assert len(found) == 1 and found[0].text.startswith("homework homework")
        assert 64 * 1024 <= meter.bytes < 64 * 1024 + 2_000

    def test_the_same_message_reads_the_same_from_imap_as_from_a_file(
        self, dovecot: Dovecot, tmp_path: Path
    ) -> None:
        """IMAP mail is decoded by the file parser: a forwarded message, HTML only, charsets."""
        inner = EmailMessage()
        inner["From"] = "parent@example.net"
        inner["Subject"] = "Trip"
        inner.set_content("Can Amy come on the museum trip?")
        fwd = EmailMessage()
        fwd["From"] = "Jane Smith <jane.smith@choysez.org.uk>"
        fwd["To"] = "jane.smith77@gmail.com"
        fwd["Subject"] = "=?utf-8?q?Fwd=3A_Trip_=E2=80=93_consent?="
        fwd.set_content("See below.")
        fwd.add_attachment(inner)
        html = EmailMessage()
        html["From"] = "Jane Smith <jane.smith77@gmail.com>"
        html["To"] = "parent@example.net"
        html["Subject"] = "Homework"
        html.set_content("<p>Homework for <b>Amy</b>&nbsp;is due</p>", subtype="html")
        latin = EmailMessage()
        latin["From"] = "tbaker.home@outlook.com"
        latin["To"] = "parent@example.net"
        latin["Subject"] = "Caf\u00e9"
        latin.set_content(
            "R\u00e9sum\u00e9 of parents' evening " * 50, charset="iso-8859-1", cte="quoted-printable"
        )
        b64 = EmailMessage()
        b64["From"] = "sam.okafor@icloud.com"
        b64["To"] = "pupil@example.net"
        b64["Subject"] = "b64"
        b64.set_content("Geb\u00fchr f\u00fcr die Klassenfahrt \u2013 bitte zahlen", cte="base64")
        raws = [fwd.as_bytes(), html.as_bytes(), latin.as_bytes(), b64.as_bytes()]
        append(dovecot, *raws)

        found, _, _ = Scan(make_source(dovecot, tmp_path), tmp_path).run()

        assert len(found) == 4
        for got, raw in zip(found, raws, strict=True):
            want = parse_message(raw, source="staff-imap", location=got.location)
            assert (got.sender, got.to, got.cc, got.subject, got.date, got.message_id) == (
                want.sender,
                want.to,
                want.cc,
                want.subject,
                want.date,
                want.message_id,
            )
            assert got.text.split() == want.text.split()
        assert "museum trip" in found[0].text  # the forwarded message's text came too
        assert "Amy" in found[1].text and "<p>" not in found[1].text

    def test_a_malformed_message_is_read_and_the_folder_goes_on(
        self, dovecot: Dovecot, tmp_path: Path
    ) -> None:
        broken = (
            b"From: =?bogus-charset?q?Jane?= <jane.smith77@gmail.com>\r\n"
            b"To: parent@example.net\r\n"
            b"Subject: =?utf-8?b?broken base64?=\r\n"
            b"Date: not a date\r\n"
            b"Content-Type: multipart/mixed; boundary=NEVER\r\n"
            b"\r\n"
            b"--WRONG\r\nContent-Type: text/plain; charset=x-unknown\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            b"!!!not base64 at all???\r\n"
        )
        append(dovecot, message(1), broken, message(3))
        found, stats, _ = Scan(make_source(dovecot, tmp_path), tmp_path).run()
        assert [m.location[-5:] for m in found] == ["UID=1", "UID=2", "UID=3"]
        assert found[1].sender is not None and found[1].sender.email == "jane.smith77@gmail.com"
        assert found[1].date is None
        assert stats.messages == 3 and stats.unparseable == 0


class TestFailures:
    """One clear SourceError per source, quickly, naming the source and never the secret."""

    def test_a_wrong_password_is_named_without_the_password(
        self, lone_dovecot: Dovecot, tmp_path: Path
    ) -> None:
        src = make_source(lone_dovecot, tmp_path)
        (tmp_path / "imap-password").write_text("Wr0ng-Secret-value\n")
        with pytest.raises(SourceError) as err:
            Scan(src, tmp_path).run()
        text = str(err.value)
        assert text == "staff-imap: cannot log in as audit: [AUTHENTICATIONFAILED] Authentication failed."
        assert "Wr0ng" not in text and err.value.__cause__ is None

    def test_an_unreachable_port_fails_at_once(self, dovecot: Dovecot, tmp_path: Path) -> None:
        src = make_source(dovecot, tmp_path, port=free_port())
        start = time.monotonic()
        with pytest.raises(
            SourceError, match=r"^staff-imap: cannot connect to 127\.0\.0\.1:\d+: Connection refused"
        ):
            Scan(src, tmp_path).run()
        assert time.monotonic() - start < 3

    def test_an_untrusted_certificate_is_refused(self, dovecot: Dovecot, tmp_path: Path) -> None:
        """TLS is verified by default: Dovecot's self-signed certificate is not accepted."""
        src = make_source(dovecot, tmp_path, port=dovecot.tls_port, tls=True)
        with pytest.raises(SourceError, match=r"TLS certificate not trusted .*self.signed"):
            Scan(src, tmp_path).run()

    def test_a_missing_folder_is_reported_after_the_others_are_read(
        self, dovecot: Dovecot, tmp_path: Path
    ) -> None:
        append(dovecot, message(1))
        src = make_source(dovecot, tmp_path, folders=["Nope", "INBOX"])
        got: list[MailMessage] = []

        def drain() -> None:
            got.extend(
                m for m, _ in read_imap(src, base=tmp_path, previous={}, stats=MailStats(), tuning=FAST)
            )

        with pytest.raises(SourceError, match=r"^staff-imap: cannot read folder 'Nope': .*Mailbox doesn't"):
            drain()
        assert [m.subject for m in got] == ["Message 1"]

    def test_probe(self, dovecot: Dovecot, tmp_path: Path) -> None:
        append(dovecot, message(1), folder="Sent")
        probe_imap(make_source(dovecot, tmp_path, folders=["INBOX", "Sent"]), tmp_path)
        with pytest.raises(SourceError, match="cannot read folder 'Archive'"):
            probe_imap(make_source(dovecot, tmp_path, folders=["Archive"]), tmp_path)
        with pytest.raises(SourceError, match="cannot connect"):
            probe_imap(make_source(dovecot, tmp_path, port=free_port()), tmp_path)


class DroppingProxy:
    """A TCP relay to Dovecot that cuts the first `drops` connections after `after` bytes from the server."""

    def __init__(self, target: tuple[str, int], *, after: int, drops: int) -> None:
        self.target, self.after, self.drops = target, after, drops
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(self.target)
            limit = self.after if self.connections <= self.drops else None
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, limit), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[: limit - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxy_factory(dovecot: Dovecot) -> Iterator[Any]:
    made: list[DroppingProxy] = []

    def make(after: int, drops: int) -> DroppingProxy:
        p = DroppingProxy((dovecot.host, dovecot.port), after=after, drops=drops)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


class TestReconnect:
    """A connection lost mid-scan is reopened and the scan resumes where it was."""

    def test_a_dropped_connection_resumes_after_the_last_message(
        self, dovecot: Dovecot, tmp_path: Path, proxy_factory: Any
    ) -> None:
        append(dovecot, *(message(n) for n in range(12)))
        proxy = proxy_factory(after=2_500, drops=2)
        found, _, meter = Scan(make_source(dovecot, tmp_path, port=proxy.port), tmp_path).run()
        assert [m.subject for m in found] == [f"Message {n}" for n in range(12)]
        assert meter.reconnects == 2 and proxy.connections == 3

    def test_a_connection_that_keeps_dropping_gives_up(
        self, dovecot: Dovecot, tmp_path: Path, proxy_factory: Any
    ) -> None:
        append(dovecot, *(message(n) for n in range(12)))
        proxy = proxy_factory(after=1_200, drops=100)
        with pytest.raises(SourceError, match=r"lost while reading 'INBOX' .*gave up after 4 attempts"):
            Scan(make_source(dovecot, tmp_path, port=proxy.port), tmp_path).run()


class TestEndToEnd:
    """`scan mail` over an IMAP source finds what the same message in a Maildir would."""

    def test_scan_mail_finds_a_personal_sender_over_imap(
        self, dovecot: Dovecot, school: Path, cli: Run
    ) -> None:
        sample = SAMPLE / "mail" / "cur" / "1763384511.M101P2001.mail1.choysez.org.uk:2,S"
        append(dovecot, sample.read_bytes(), message(2, sender="newsletter@example.org"))
        before = flags(dovecot)
        (school / "imap-password").write_text(dovecot.password + "\n")
        with (school / "config.toml").open("a") as fh:
            fh.write(
                f"""
[[mail.sources]]
name = "staff-imap"
type = "imap"
host = "127.0.0.1"
port = {dovecot.port}
tls = false
username = "{dovecot.user}"
password_file = "imap-password"
folders = ["INBOX"]
"""
            )
        config = school / "config.toml"

        cli("check", "--config", config, check=True)
        first = cli("scan", "mail", "--source", "staff-imap", "--config", config, check=True)
        again = cli("scan", "mail", "--source", "staff-imap", "--config", config, check=True)
        listed = cli(
            "findings", "--rule", "MAIL-PERSONAL-SENDER", "--format", "json", "--config", config, check=True
        )

        findings = json.loads(listed.stdout)
        assert [(f["subject"]["staff"], f["subject"]["address"]) for f in findings] == [
            ("jane.smith@choysez.org.uk", "jane.smith77@gmail.com")
        ]
        assert "staff-imap: 2 items read, 1 new findings" in first.stdout
        assert "staff-imap: 0 items read, 0 new findings" in again.stdout
        assert flags(dovecot) == before

    def test_check_names_a_wrong_password(self, lone_dovecot: Dovecot, school: Path, cli: Run) -> None:
        (school / "imap-password").write_text("not-the-password\n")
        with (school / "config.toml").open("a") as fh:
            fh.write(
                f'\n[[mail.sources]]\nname = "staff-imap"\ntype = "imap"\nhost = "127.0.0.1"\n'
                f'port = {lone_dovecot.port}\ntls = false\nusername = "audit"\n'
                'password_file = "imap-password"\n'
            )
        proc = cli("check", "--config", school / "config.toml")
        assert proc.returncode == 1
        assert "source staff-imap: FAILED: cannot log in as audit: [AUTHENTICATIONFAILED]" in proc.stdout
        assert "not-the-password" not in proc.stdout + proc.stderr


class TestFetchParsing:
    """The FETCH answer parser (used instead of imapclient's for speed) on what imaplib returns."""

    def test_literals_quoted_strings_nil_and_nesting(self) -> None:
        data = [
            (
                b'1 (UID 7 RFC822.SIZE 99 BODYSTRUCTURE (("text" "plain" ("charset" "utf-8") NIL NIL "7bit"'
                b' 12 1 NIL NIL NIL NIL)("application" "pdf" ("name" {5}',
                b'a"b c',
            ),
            (
                b') NIL NIL "base64" 100 NIL ("attachment" ("filename" "a \\"q\\".txt")) NIL NIL) "mixed"'
                b' ("boundary" "xx") NIL NIL NIL) BODY[HEADER]<0> {10}',
                b"Subject: x",
            ),
            b")",
            b'2 (FLAGS (\\Seen) UID 8 BODYSTRUCTURE ("TEXT" "PLAIN" NIL NIL NIL "QUOTED-PRINTABLE" 3 1'
            b" NIL NIL NIL NIL))",
            b"3 (FLAGS (\\Seen))",  # an unsolicited update without UID: ignored
        ]
        got = parse_fetch(data)
        assert set(got) == {7, 8}
        assert got[7][b"RFC822.SIZE"] == 99 and got[7][b"BODY[HEADER]<0>"] == b"Subject: x"
        tree = parse_structure(got[7][b"BODYSTRUCTURE"])
        assert (tree.maintype, tree.subtype) == ("multipart", "mixed")
        plain, pdf = tree.children
        assert (plain.section, plain.charset, plain.fetch) == ("1", "utf-8", True)
        assert (pdf.section, pdf.disposition, pdf.fetch, pdf.size) == ("2", "attachment", False, 100)
        single = parse_structure(got[8][b"BODYSTRUCTURE"])
        assert (single.section, single.subtype, single.encoding, single.fetch) == (
            "1",
            "plain",
            "quoted-printable",
            True,
        )

    def test_unbalanced_answers_are_refused(self) -> None:
        with pytest.raises(IMAPClientError):
            parse_fetch([b"1 (UID 1 BODYSTRUCTURE (x"])
        with pytest.raises(IMAPClientError):
            parse_fetch([b"1 (UID 1))"])
