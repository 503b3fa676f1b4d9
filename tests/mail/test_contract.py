"""Every mail backend meets the `MailSource` contract: the same messages in, the same behaviour out.

Files, IMAP (a real Dovecot), EWS and Graph (local peers replaying recorded responses) each hold the
same three messages: the recorded EWS and Graph answers decide what they are, and the file and IMAP
cases are written to match. Each backend is built by `mail_source` from a config entry, as the
pipeline builds it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from auditd.config import EwsSource, FileMailSource, GraphSource, ImapSource
from auditd.errors import SourceError
from auditd.model import Address, MailMessage
from auditd.sources.base import MailSource, mail_source
from auditd.sources.mailfile import MailStats
from tests.mail import ews_peer, graph_peer
from tests.mail.dovecot import Dovecot, free_port

BACKENDS = ["maildir", "mbox", "eml", "imap", "ews", "graph"]
NOW = dt.datetime(2026, 11, 24, 9, 0, tzinfo=dt.UTC)

# (message id, from, to, cc, subject, body): what tests/data/ews and tests/data/graph hold
MESSAGES = [
    (
        "<trip@choysez.org.uk>",
        "Jane Smith <Jane.Smith@choysez.org.uk>",
        "Grace Okafor <grace.okafor@example.net>",
        "Jane Smith <jane.smith77@gmail.com>",
        "Trip to the Science Museum: permission slip",
        "Hi Mrs Okafor,\nPlease sign the permission slip for Tom's trip on Friday.\nJane\n",
    ),
    (
        "<homework@mail.example.net>",
        "Grace Okafor <grace.okafor@example.net>",
        "Jane Smith <jane.smith@choysez.org.uk>",
        None,
        "Re: homework club",
        "Thanks Jane, the homework club sheet is attached.\n",
    ),
    (
        "<rota@choysez.org.uk>",
        "Centre Manager <centre.manager@choysez.org.uk>",
        "Jane Smith <jane.smith@choysez.org.uk>",
        None,
        "Rota for next week",
        "Rota attached.\n",
    ),
]
BODY_LINES = [
    "Please sign the permission slip for Tom's trip on Friday.",
    "homework club sheet",
    "Rota attached.",
]


def _raw(n: int) -> bytes:
    msg_id, sender, to, cc, subject, body = MESSAGES[n]
    m = EmailMessage()
    m["From"] = sender
    m["To"] = to
    if cc:
        m["Cc"] = cc
    m["Subject"] = subject
    m["Message-ID"] = msg_id
    m["Date"] = f"Fri, {20 + n} Nov 2026 16:02:11 +0000"
    m.set_content(body)
    return m.as_bytes()


@dataclass
class Case:
    """A backend holding the three messages, the same backend broken, and a secret it must not show."""

    good: MailSource
    broken: MailSource
    secret: str | None = None


def _file_case(kind: str, tmp_path: Path) -> Case:
    if kind == "maildir":
        path = tmp_path / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (path / sub).mkdir(parents=True)
        for n in range(3):
            (path / "new" / f"17950000{n}.M{n}P1.host").write_bytes(_raw(n))
    elif kind == "mbox":
        path = tmp_path / "mail.mbox"
        path.write_bytes(
            b"".join(b"From MAILER-DAEMON Fri Nov 20 16:02:11 2026\n" + _raw(n) + b"\n" for n in range(3))
        )
    else:
        path = tmp_path / "eml"
        path.mkdir()
        for n in range(3):
            (path / f"{n}.eml").write_bytes(_raw(n))

    def build(p: Path) -> MailSource:
        return mail_source(
            FileMailSource.model_validate({"name": "files", "type": kind, "path": str(p)}), tmp_path
        )

    return Case(build(path), build(tmp_path / "missing"))


def _imap_case(server: Dovecot, tmp_path: Path) -> Case:
    client = server.client()
    try:
        for n in range(3):
            client.append("INBOX", _raw(n))
    finally:
        client.logout()
    (tmp_path / "imap-password").write_text(server.password + "\n")

    def build(port: int) -> MailSource:
        fields: dict[str, Any] = {
            "name": "staff-imap",
            "type": "imap",
            "host": server.host,
            "port": port,
            "tls": False,
            "username": server.user,
            "password_file": "imap-password",
        }
        return mail_source(ImapSource.model_validate(fields), tmp_path)

    return Case(build(server.port), build(free_port()), server.password)


@pytest.fixture(params=BACKENDS)
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    kind: str = request.param
    with ExitStack() as stack:
        if kind == "imap":
            yield _imap_case(request.getfixturevalue("dovecot"), tmp_path)
        elif kind == "ews":
            _, url = stack.enter_context(ews_peer.serve())
            good = ews_peer.source(url, tmp_path)
            closed = ews_peer.source(f"http://127.0.0.1:{free_port()}/EWS/Exchange.asmx", tmp_path)
            assert isinstance(good, EwsSource)
            yield Case(mail_source(good, tmp_path), mail_source(closed, tmp_path), "Pa55word!")
        elif kind == "graph":
            tls = graph_peer.self_signed(tmp_path)
            peer = stack.enter_context(graph_peer.serve(tls))
            src = graph_peer.source(peer, tmp_path, tls)
            assert isinstance(src, GraphSource)
            (tmp_path / "wrong-secret").write_text("not-the-secret-4711\n")
            wrong = graph_peer.source(peer, tmp_path, tls, client_secret_file="wrong-secret")
            yield Case(mail_source(src, tmp_path), mail_source(wrong, tmp_path), "not-the-secret-4711")
        else:
            yield _file_case(kind, tmp_path)


def _read(
    source: MailSource, previous: dict[str, str]
) -> tuple[list[MailMessage], dict[str, str], MailStats]:
    stats = MailStats()
    messages: list[MailMessage] = []
    merged: dict[str, str] = {}
    for msg, updates in source.read(previous, stats):
        if msg is not None:
            messages.append(msg)
        merged.update(updates)
    return messages, merged, stats


class TestContract:
    """What the pipeline relies on from every backend."""

    def test_first_read_yields_the_messages_parsed_and_named_after_the_source(self, case: Case) -> None:
        messages, updates, stats = _read(case.good, {})

        assert sorted(m.subject for m in messages) == sorted(m[4] for m in MESSAGES)
        assert {m.source for m in messages} == {case.good.name}
        trip = next(m for m in messages if m.subject.startswith("Trip"))
        assert trip.sender is not None and trip.sender.email == "jane.smith@choysez.org.uk"
        assert trip.sender.name == "Jane Smith"
        assert [a.email for a in trip.to] == ["grace.okafor@example.net"]
        assert trip.cc == (Address("jane.smith77@gmail.com", "Jane Smith"),)
        assert "permission slip for Tom's trip" in trip.text
        rota = next(m for m in messages if m.subject == "Rota for next week")
        assert rota.sender is not None and rota.sender.email == "centre.manager@choysez.org.uk"
        assert [a.email for a in rota.to] == ["jane.smith@choysez.org.uk"]
        assert updates and all(isinstance(v, str) for v in updates.values())
        assert stats.unparseable == 0

    def test_reading_again_from_the_checkpoints_yields_nothing(self, case: Case) -> None:
        _, updates, _ = _read(case.good, {})

        again, later, _ = _read(case.good, updates)

        assert again == []
        # a checkpoint may move on (Graph hands out a new delta link), but is never reset to restart
        assert all(later.values())

    def test_probe_passes_on_a_good_source_and_fails_in_one_line_on_a_broken_one(self, case: Case) -> None:
        case.good.probe()

        with pytest.raises(SourceError) as exc:
            case.broken.probe()

        text = str(exc.value)
        assert "\n" not in text and exc.value.where == case.broken.name
        if case.secret is not None:
            assert case.secret not in text

    def test_no_message_body_appears_in_its_location_or_source(self, case: Case) -> None:
        messages, _, _ = _read(case.good, {})

        assert len(messages) == 3
        for msg in messages:
            body = [line for line in BODY_LINES if line in msg.text]
            assert body, msg.text  # the premise: the body was read
            for line in body:
                assert line not in msg.location and line not in msg.source
            assert msg.location and msg.text not in msg.location

    def test_forwarding_rules_are_a_list_named_after_the_source(self, case: Case) -> None:
        rules = case.good.forwarding_rules(NOW)

        assert isinstance(rules, list)
        assert all(r.source == case.good.name and r.seen_at == NOW for r in rules)
