"""Sending the digest: to a real SMTP server on loopback (aiosmtpd), once per day and recipient.

The server is aiosmtpd's Controller with a handler that keeps every envelope; the STARTTLS test
makes a self-signed certificate with `cryptography` and requires AUTH over TLS.
"""

from __future__ import annotations

import email
import email.policy
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from auditd.config import load_config
from auditd.digest.send import (
    SmtpSettings,
    deliver_day,
    deliver_due,
    digest_window,
    due_days,
    latest_due_day,
    message_id,
    retry_delay,
)
from auditd.errors import DeliveryError
from auditd.pipeline import Context, scan_mail, scan_net
from auditd.store import Store
from tests.certs import self_signed as make_certificate

LONDON = ZoneInfo("Europe/London")
SEVEN = time(7, 0)
ICT = "ict.manager@choysez.org.uk"
DSL = "dsl@choysez.org.uk"


# ---- a real SMTP server on loopback -------------------------------------------------------------


@dataclass
class Inbox:
    """aiosmtpd handler that keeps what it is given."""

    received: list[tuple[str, list[str], bytes]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 OK"

    def messages(self) -> dict[str, EmailMessage]:
        """The messages received, by envelope recipient (each exactly one, or the test fails)."""
        out: dict[str, EmailMessage] = {}
        for _, rcpts, raw in self.received:
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            assert isinstance(msg, EmailMessage)
            for r in rcpts:
                assert r not in out, f"{r} got two messages"
                out[r] = msg
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    """A plain SMTP server on 127.0.0.1 (loopback: no STARTTLS by default)."""
    yield from serve_smtp()


def serve_smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def set_digest(config: Path, **keys: object) -> None:
    """Replace the sample school's [digest] section (the last one in the file)."""
    text = config.read_text()
    lines = ["[digest]"]
    for k, v in {"from": "choysez-auditd@choysez.org.uk", **keys}.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, int):
            lines.append(f"{k} = {v}")
        else:
            lines.append(f'{k} = "{v}"')
    config.write_text(text[: text.index("[digest]")] + "\n".join(lines) + "\n")


def scanned(school: Path, now: datetime) -> None:
    """Scan the sample school's mail and capture into its store, in-process."""
    config = load_config(school / "config.toml")
    with Store.open(config.store.path) as store:
        ctx = Context.load(config, store)
        reports = scan_mail(ctx, now=now) + scan_net(ctx, now=now)
    assert all(r.ok for r in reports), reports


def bodies(msg: EmailMessage) -> tuple[str, str]:
    plain = msg.get_body(preferencelist=("plain",))
    html = msg.get_body(preferencelist=("html",))
    assert plain is not None and html is not None
    return plain.get_content(), html.get_content()


HOSTILE_MAIL = (
    "From: Jane Smith <jane.smith77@gmail.com>\r\n"
    "To: Mark Evans <mark.evans@example.net>\r\n"
    "Subject: =?utf-8?b?{}?=\r\n"
    "Date: Tue, 24 Nov 2026 18:00:00 +0000\r\n"
    "Message-ID: <hostile.1@gmail.com>\r\n"
    "\r\n"
    "Dear Mr Evans, Lily Evans has homework for the Choysez trip, consent form attached.\r\n"
)


def hostile_subject() -> str:
    import base64

    raw = 'Lily homework\r\nBcc: evil@example.com\r\n<script>alert("x")</script> <img src=x>'
    return base64.b64encode(raw.encode()).decode()


# ---- tests --------------------------------------------------------------------------------------


class TestWhichDayIsDue:
    """Pure: the day, the window and the catch-up follow the local clock, given `now`."""

    def test_window_is_a_local_day_across_the_clock_change(self) -> None:
        # Sunday 25 October 2026: the clocks go back, so that digest covers 25 hours.
        start, end = digest_window(date(2026, 10, 25), SEVEN, LONDON)
        assert start == datetime(2026, 10, 24, 6, 0, tzinfo=UTC)
        assert end == datetime(2026, 10, 25, 7, 0, tzinfo=UTC)
        assert end - start == timedelta(hours=25)

    def test_latest_due_day_turns_at_the_digest_time(self) -> None:
        assert latest_due_day(datetime(2026, 11, 24, 6, 59, tzinfo=UTC), SEVEN, LONDON) == date(2026, 11, 23)
        assert latest_due_day(datetime(2026, 11, 24, 7, 0, tzinfo=UTC), SEVEN, LONDON) == date(2026, 11, 24)
        # in summer 07:00 in London is 06:00 UTC
        assert latest_due_day(datetime(2026, 7, 1, 6, 0, tzinfo=UTC), SEVEN, LONDON) == date(2026, 7, 1)

    def test_the_tick_sends_today_and_a_restart_does_not_start_afresh(self) -> None:
        now = datetime(2026, 11, 24, 7, 0, 1, tzinfo=UTC)
        tick = due_days(now, SEVEN, LONDON, records={}, last_sent=None, include_latest=True)
        assert tick == [date(2026, 11, 24)]
        assert due_days(now, SEVEN, LONDON, records={}, last_sent=None, include_latest=False) == []

    def test_asleep_over_the_digest_time_sends_the_missed_days_once(self) -> None:
        now = datetime(2026, 11, 24, 9, 30, tzinfo=UTC)  # woke up at 09:30; last sent on the 22nd
        due = due_days(now, SEVEN, LONDON, records={}, last_sent=date(2026, 11, 22), include_latest=False)
        assert due == [date(2026, 11, 23), date(2026, 11, 24)]
        sent = {date(2026, 11, 23): True, date(2026, 11, 24): True}
        assert (
            due_days(now, SEVEN, LONDON, records=sent, last_sent=date(2026, 11, 24), include_latest=True)
            == []
        )

    def test_a_failed_day_stays_due_until_sent(self) -> None:
        now = datetime(2026, 11, 26, 7, 0, tzinfo=UTC)
        records = {date(2026, 11, 24): False, date(2026, 11, 25): True}
        due = due_days(
            now, SEVEN, LONDON, records=records, last_sent=date(2026, 11, 25), include_latest=False
        )
        assert due == [date(2026, 11, 24), date(2026, 11, 26)]

    def test_back_off_doubles_and_is_capped(self) -> None:
        first = timedelta(seconds=60)
        assert [retry_delay(n, first).total_seconds() for n in (1, 2, 3)] == [60, 120, 240]
        assert retry_delay(50, first) == timedelta(minutes=30)


class TestDelivery:
    """A real SMTP server on loopback receives one multipart/alternative digest per person."""

    NOW = datetime(2026, 11, 25, 7, 0, 5, tzinfo=UTC)
    DAY = date(2026, 11, 25)

    def prepare(self, school: Path, port: int, **digest: object) -> None:
        set_digest(school / "config.toml", smtp_host="127.0.0.1", smtp_port=port, time="07:00", **digest)
        scanned(school, self.NOW - timedelta(hours=3))

    def deliver(self, school: Path) -> list[Any]:
        config = load_config(school / "config.toml")
        from auditd.policy import load_policy

        with Store.open(config.store.path) as store:
            return deliver_day(
                config, store, load_policy(None), self.DAY, self.NOW, SmtpSettings.from_config(config).send
            )

    def test_ict_manager_gets_all_and_the_dsl_only_pupil_findings(
        self, school: Path, smtp: tuple[Inbox, int]
    ) -> None:
        inbox, port = smtp
        self.prepare(school, port)
        outcomes = self.deliver(school)
        assert {(o.recipient, o.status) for o in outcomes} == {(ICT, "sent"), (DSL, "sent")}
        got = inbox.messages()
        assert set(got) == {ICT, DSL}
        for who, msg in got.items():
            assert msg.get_content_type() == "multipart/alternative"
            assert msg["To"] == who and msg["From"] == "choysez-auditd@choysez.org.uk"
            assert msg["Message-ID"] == message_id(self.DAY, who, "choysez-auditd@choysez.org.uk")
        ict_text, ict_html = bodies(got[ICT])
        dsl_text, dsl_html = bodies(got[DSL])
        for text in (ict_text, ict_html):
            assert "NET-STREAMING-IN-CLASS" in text and "Room 12" in text
            assert "MAIL-PERSONAL-SENDER" in text and "jane.smith@choysez.org.uk" in text
            assert "SMP-1.10" in text and "SMP-1.5" in text
        for text in (dsl_text, dsl_html):
            assert "MAIL-PERSONAL-SENDER" in text and "jane.smith@choysez.org.uk" in text
            assert "NET-STREAMING-IN-CLASS" not in text and "Room 12" not in text and "Netflix" not in text
            assert "only findings that involve pupils" in text
        assert "pupil-related" in got[DSL]["Subject"] and "pupil-related" not in got[ICT]["Subject"]
        # The approval: what it suppressed, and what it covered.
        assert "covered by approval #1" not in ict_text  # the sample approval is granted by the demo only
        assert "SOURCE HEALTH" in ict_text and "sample-maildir (mail): OK" in ict_text
        assert "NEW FINDINGS, LAST 14 DAYS" in ict_text
        assert "<script" not in ict_html and "<img" not in ict_html

    def test_sent_once_even_when_asked_again(self, school: Path, smtp: tuple[Inbox, int]) -> None:
        inbox, port = smtp
        self.prepare(school, port)
        self.deliver(school)
        again = self.deliver(school)
        assert {o.status for o in again} == {"skipped"}
        assert len(inbox.received) == 2

    def test_smtp_down_is_recorded_retried_and_sent_once_when_it_comes_back(self, school: Path) -> None:
        port = free_port()
        self.prepare(school, port)
        failed = self.deliver(school)
        assert {o.status for o in failed} == {"failed"}
        assert all("Connection refused" in (o.error or "") for o in failed)
        config = load_config(school / "config.toml")
        with Store.open(config.store.path) as store:
            record = store.digest_record(self.DAY.isoformat(), ICT)
            assert record is not None and record.status == "failed" and record.attempts == 1
        inbox = Inbox()
        controller = Controller(inbox, hostname="127.0.0.1", port=port)
        controller.start()
        try:
            from auditd.policy import load_policy

            later = self.NOW + timedelta(minutes=2)
            with Store.open(config.store.path) as store:
                send = SmtpSettings.from_config(config).send
                first = deliver_due(config, store, load_policy(None), later, send, include_latest=False)
                second = deliver_due(config, store, load_policy(None), later, send, include_latest=True)
                record = store.digest_record(self.DAY.isoformat(), ICT)
        finally:
            controller.stop()
        assert {(o.recipient, o.status) for o in first} == {(ICT, "sent"), (DSL, "sent")}
        assert second == []
        assert record is not None and record.status == "sent" and record.attempts == 2
        assert sorted(r for _, rcpts, _ in inbox.received for r in rcpts) == [DSL, ICT]

    def test_hostile_subject_cannot_add_headers_or_markup(
        self, school: Path, smtp: tuple[Inbox, int]
    ) -> None:
        inbox, port = smtp
        (school / "mail" / "new").mkdir(exist_ok=True)
        (school / "mail" / "new" / "1764007200.M1P1.hostile").write_text(
            HOSTILE_MAIL.format(hostile_subject())
        )
        self.prepare(school, port)
        self.deliver(school)
        assert all(rcpts in ([ICT], [DSL]) for _, rcpts, _ in inbox.received)
        msg = inbox.messages()[ICT]
        assert msg["Bcc"] is None
        text, html = bodies(msg)
        assert "Lily homework" in text
        assert not any(line.startswith("Bcc:") for line in text.splitlines())
        assert "<script>" not in html and "&lt;script&gt;" in html and "<img" not in html


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here (no files from elsewhere)."""
    return make_certificate(tmp, "smtp")


class TestStarttlsAndAuth:
    """The server requires STARTTLS before AUTH, and AUTH before mail; the password is in a file."""

    def test_starttls_then_auth_with_the_password_file(self, school: Path, tmp_path: Path) -> None:
        cert, key = self_signed(tmp_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        logins: list[tuple[bytes, bool]] = []

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
            ok = isinstance(data, LoginPassword) and data.login == b"auditd" and data.password == b"s3cret pw"
            logins.append((data.login if isinstance(data, LoginPassword) else b"", session.ssl is not None))
            return AuthResult(success=ok, handled=False)

        inbox = Inbox()
        port = free_port()
        controller = Controller(
            inbox,
            hostname="127.0.0.1",
            port=port,
            tls_context=context,
            require_starttls=True,
            auth_require_tls=True,
            auth_required=True,
            authenticator=authenticator,
            auth_exclude_mechanism=["LOGIN"],  # one mechanism: a wrong password fails at once
        )
        controller.start()
        try:
            (school / "smtp-password").write_text("s3cret pw\n")
            TestDelivery().prepare(
                school,
                port,
                starttls=True,
                username="auditd",
                password_file="smtp-password",
                ca_file=str(cert),
            )
            outcomes = TestDelivery().deliver(school)
            assert {o.status for o in outcomes} == {"sent"}, outcomes
            assert logins and all(tls for _, tls in logins)
            assert set(inbox.messages()) == {ICT, DSL}

            (school / "smtp-password").write_text("wrong\n")
            config = load_config(school / "config.toml")
            with pytest.raises(DeliveryError, match="SMTPAuthenticationError"):
                SmtpSettings.from_config(config).send(EmailMessage())
        finally:
            controller.stop()

    def test_an_untrusted_certificate_is_refused(self, school: Path, tmp_path: Path) -> None:
        cert, key = self_signed(tmp_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        port = free_port()
        controller = Controller(Inbox(), hostname="127.0.0.1", port=port, tls_context=context)
        controller.start()
        try:
            set_digest(school / "config.toml", smtp_host="127.0.0.1", smtp_port=port, starttls=True)
            config = load_config(school / "config.toml")
            with pytest.raises(DeliveryError, match="CERTIFICATE_VERIFY_FAILED"):
                SmtpSettings.from_config(config).send(EmailMessage())
        finally:
            controller.stop()
