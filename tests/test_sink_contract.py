"""Every digest sink meets the `Sink` contract: the message arrives whole, or a one-line DeliveryError.

The SMTP sink delivers to a real aiosmtpd server on loopback; the file sink writes the `.eml`. Each is
also built broken (a closed port, a folder that is a file) to pin down how it fails.
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest

from auditd.digest.render import DigestData
from auditd.digest.send import FileSink, Sink, SmtpSettings, compose, message_id
from auditd.errors import DeliveryError
from tests.test_digest_send import free_port, serve_smtp

NOW = datetime(2026, 11, 25, 7, 0, tzinfo=UTC)
DAY = date(2026, 11, 25)
SENDER, RECIPIENT = "auditd@choysez.org.uk", "ict.manager@choysez.org.uk"


def _message() -> EmailMessage:
    data = DigestData(
        organisation="Choysez Youth Centre",
        day=DAY,
        generated_at=NOW,
        new=(),
        still_open=(),
        approvals=(),
        health=(),
        clauses={},
        rule_titles={},
    )
    msgid = message_id(DAY, RECIPIENT, SENDER)
    return compose(data, sender=SENDER, recipient=RECIPIENT, msgid=msgid, now=NOW)


@dataclass
class Case:
    """A working sink, how to read back what it received, and the same sink broken."""

    good: Sink
    received: Callable[[], list[bytes]]
    broken: Sink
    where: str

    def collect(self) -> list[EmailMessage]:
        out = []
        for raw in self.received():
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            assert isinstance(msg, EmailMessage)
            out.append(msg)
        return out


@pytest.fixture(params=["smtp", "file"])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    if request.param == "smtp":
        with contextmanager(serve_smtp)() as (inbox, port):
            closed = free_port()
            yield Case(
                SmtpSettings("127.0.0.1", port, starttls=False),
                lambda: [raw for _, _, raw in inbox.received],
                SmtpSettings("127.0.0.1", closed, starttls=False, timeout=5),
                f"smtp://127.0.0.1:{closed}",
            )
    else:
        (tmp_path / "not-a-folder").write_text("")
        broken = tmp_path / "not-a-folder" / "digest.eml"
        out = tmp_path / "out" / "digest.eml"
        yield Case(
            FileSink(out),
            lambda: [out.read_bytes()] if out.exists() else [],
            FileSink(broken),
            str(broken),
        )


def _lines(text: str) -> list[str]:
    return text.splitlines()


class TestContract:
    """What the digest delivery relies on from every sink."""

    def test_a_delivered_message_arrives_whole(self, case: Case) -> None:
        sent = _message()

        case.good.deliver(sent)

        [got] = case.collect()
        assert got["Message-ID"] == sent["Message-ID"]
        assert got["Subject"] == sent["Subject"] and got["To"] == RECIPIENT
        for kind in ("plain", "html"):
            ours, theirs = sent.get_body((kind,)), got.get_body((kind,))
            assert isinstance(ours, EmailMessage) and isinstance(theirs, EmailMessage)
            # the same text; line ends are the transport's (CRLF on the wire and in the .eml)
            assert _lines(theirs.get_content()) == _lines(ours.get_content())
        assert "Choysez Youth Centre" in str(got.get_body(("plain",)))

    def test_a_broken_sink_raises_one_line_naming_where(self, case: Case) -> None:
        with pytest.raises(DeliveryError) as exc:
            case.broken.deliver(_message())

        assert "\n" not in str(exc.value) and exc.value.where == case.where


@pytest.mark.parametrize("form", ["text", "html"])
def test_a_file_sink_can_keep_just_the_body(form: str, tmp_path: Path) -> None:
    msg = _message()
    path = tmp_path / f"digest.{form}"

    FileSink(path, "text" if form == "text" else "html").deliver(msg)

    part = msg.get_body(("plain",) if form == "text" else ("html",))
    assert isinstance(part, EmailMessage)
    assert path.read_text(encoding="utf-8") == part.get_content()
    assert "Message-ID" not in path.read_text(encoding="utf-8")
