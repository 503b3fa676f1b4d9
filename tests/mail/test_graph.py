"""The Microsoft Graph source against a local HTTPS peer serving recorded, documented responses.

msal and requests do the talking: OpenID discovery, the client-credentials token request, delta
rounds with nextLink/deltaLink, 410 and 429 answers, and inbox rules.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from auditd.config import GraphSource
from auditd.errors import SourceError
from auditd.model import Address, MailMessage
from auditd.sources.graph import delta_key, forwarding_rules_graph, probe_graph, read_graph
from auditd.sources.mailfile import MailStats
from tests.mail.graph_peer import MAILBOX, GraphPeer, self_signed, serve, source


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def peer(tls: tuple[Path, Path]) -> Iterator[GraphPeer]:
    with serve(tls) as running:
        yield running


def _run(
    src: GraphSource, tmp_path: Path, previous: dict[str, str] | None = None
) -> tuple[list[MailMessage], list[dict[str, str]], dict[str, str]]:
    messages: list[MailMessage] = []
    updates: list[dict[str, str]] = []
    saved = dict(previous or {})
    for msg, upd in read_graph(src, base=tmp_path, previous=previous or {}, stats=MailStats()):
        if msg is not None:
            messages.append(msg)
        if upd:
            updates.append(upd)
            saved.update(upd)
    return messages, updates, saved


class TestDeltaRounds:
    """Messages arrive through per-folder delta rounds whose links are the checkpoints."""

    def test_first_round_reads_every_page_and_ends_on_the_delta_link(
        self, peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        messages, updates, saved = _run(source(peer, tmp_path, tls), tmp_path)

        assert [m.subject for m in messages] == [
            "Trip to the Science Museum: permission slip",
            "Re: homework club",
            "Rota for next week",
        ]
        first = messages[0]
        assert first.source == "m365"
        assert first.location == f"graph://{MAILBOX}/inbox/AAMkAGUAAAAAAA1="
        assert first.message_id == "<CWXP265MB1234ABCD@CWXP265MB1234.GBRP265.PROD.OUTLOOK.COM>"
        assert first.sender == Address("jane.smith@choysez.org.uk", "Jane Smith")
        assert first.to == (Address("grace.okafor@example.net", "Grace Okafor"),)
        assert first.cc == (Address("jane.smith77@gmail.com", "Jane Smith"),)
        assert first.date == dt.datetime(2026, 11, 20, 16, 2, 11, tzinfo=dt.UTC)
        assert "permission slip for Tom's trip" in first.text
        assert first.headers == (("X-MS-Exchange-Inbox-Rules-Loop", "jane.smith@choysez.org.uk"),)
        assert messages[1].reply_to == (Address("grace.okafor@example.net", "Grace"),)
        # a page boundary advances the checkpoint to the nextLink, the last page to the deltaLink
        key = delta_key(MAILBOX, "inbox")
        assert [list(u) for u in updates] == [[key], [key]]
        assert updates[0][key].endswith("$skiptoken=SKIP1")
        assert (
            saved[key]
            == f"{peer.base}/v1.0/users/{MAILBOX}/mailFolders/inbox/messages/delta?$deltatoken=DELTA1"
        )

        first_request = peer.deltas()[0]
        select = first_request.query["$select"][0].split(",")
        for needed in ("internetMessageHeaders", "internetMessageId", "from", "toRecipients", "body"):
            assert needed in select
        assert 'outlook.body-content-type="text"' in first_request.headers["Prefer"]
        assert first_request.headers["Authorization"].startswith("Bearer eyJ")

    def test_second_round_replays_the_delta_link_and_finds_nothing_new(
        self, peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        src = source(peer, tmp_path, tls)
        _, _, saved = _run(src, tmp_path)
        before = len(peer.deltas())

        messages, updates, saved2 = _run(src, tmp_path, saved)

        assert messages == []
        sent = peer.deltas()[before:]
        assert len(sent) == 1 and sent[0].query["$deltatoken"] == ["DELTA1"]
        # an empty round still moves the checkpoint on, as a checkpoint-only update
        assert saved2[delta_key(MAILBOX, "inbox")].endswith("$deltatoken=DELTA2")
        assert len(updates) == 1

    def test_a_stale_delta_link_restarts_the_folder_from_scratch(
        self, peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        key = delta_key(MAILBOX, "inbox")
        stale = {key: f"{peer.base}/v1.0/users/{MAILBOX}/mailFolders/inbox/messages/delta?$deltatoken=OLD"}

        messages, updates, saved = _run(source(peer, tmp_path, tls), tmp_path, stale)

        assert len(messages) == 3
        assert updates[0] == {key: ""}  # the stale link is dropped first
        assert saved[key].endswith("$deltatoken=DELTA1")
        assert [("$deltatoken" in r.query, "$select" in r.query) for r in peer.deltas()[:2]] == [
            (True, False),
            (False, True),
        ]

    def test_a_saved_next_link_resumes_a_round_part_way(
        self, peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        key = delta_key(MAILBOX, "inbox")
        part_way = {
            key: f"{peer.base}/v1.0/users/{MAILBOX}/mailFolders/inbox/messages/delta?$skiptoken=SKIP1"
        }

        messages, _, saved = _run(source(peer, tmp_path, tls), tmp_path, part_way)

        assert [m.subject for m in messages] == ["Rota for next week"]
        assert saved[key].endswith("$deltatoken=DELTA1")


class TestThrottlingAndErrors:
    """429 waits as told within a bound; credentials failures are one clear line without the secret."""

    def test_429_with_retry_after_is_waited_for_then_retried(
        self, peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        peer.throttle = ["1"]
        started = time.monotonic()

        messages, _, _ = _run(source(peer, tmp_path, tls), tmp_path)

        assert time.monotonic() - started >= 1.0
        assert len(messages) == 3
        assert len(peer.deltas()) == 3  # the throttled request, its retry, the second page

    def test_a_retry_after_beyond_the_bound_fails_the_pass_at_once(
        self, peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        peer.throttle = ["120"]
        started = time.monotonic()
        with pytest.raises(SourceError, match=r"throttled .*Retry-After 120 s.*max_wait_seconds = 5") as exc:
            _run(source(peer, tmp_path, tls, max_wait_seconds=5), tmp_path)
        assert time.monotonic() - started < 5
        assert exc.value.where == "m365"

    def test_a_wrong_client_secret_is_one_line_naming_the_aadsts_code(
        self, peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        src = source(peer, tmp_path, tls)
        (tmp_path / "graph-secret").write_text("wrong-secret-value")

        with pytest.raises(SourceError) as exc:
            _run(src, tmp_path)

        assert str(exc.value) == "m365: cannot get a token: AADSTS7000215 invalid client secret provided"
        assert "wrong-secret-value" not in str(exc.value)

    def test_probe_passes_for_a_known_mailbox_and_names_an_unknown_one(
        self, peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        probe_graph(source(peer, tmp_path, tls), tmp_path)
        with pytest.raises(SourceError, match=r"nobody@choysez.org.uk/inbox: HTTP 404 .*ErrorInvalidUser"):
            probe_graph(source(peer, tmp_path, tls, mailboxes=["nobody@choysez.org.uk"]), tmp_path)

    def test_an_unreadable_mailbox_does_not_stop_the_others(
        self, peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        src = source(peer, tmp_path, tls, mailboxes=["nobody@choysez.org.uk", MAILBOX])
        messages: list[MailMessage] = []

        def consume() -> None:
            for msg, _ in read_graph(src, base=tmp_path, previous={}, stats=MailStats()):
                if msg is not None:
                    messages.append(msg)

        with pytest.raises(SourceError, match=r"1 folder\(s\) unreadable; first: nobody@choysez"):
            consume()
        assert len(messages) == 3


class TestCertificateAndRules:
    """A certificate credential and the inbox rules that forward mail away."""

    def test_certificate_credential_sends_an_assertion_with_the_sha1_thumbprint(
        self, peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "choysez-auditd")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        (tmp_path / "graph-cert.pem").write_bytes(pem)
        digest = hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).digest()
        peer.thumbprint = base64.urlsafe_b64encode(digest).decode().rstrip("=")

        src = source(peer, tmp_path, tls, client_secret_file=None, certificate_file="graph-cert.pem")
        messages, _, _ = _run(src, tmp_path)

        assert len(messages) == 3
        token_request = next(r for r in peer.requests if r.method == "POST")
        assert token_request.form["client_assertion_type"] == [
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        ]
        assert token_request.form["scope"] == [f"{peer.base}/.default"]

    def test_a_certificate_with_an_ec_key_is_one_clear_error(
        self, peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "choysez-auditd")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (tmp_path / "graph-cert.pem").write_bytes(pem)
        src = source(peer, tmp_path, tls, client_secret_file=None, certificate_file="graph-cert.pem")
        with pytest.raises(
            SourceError, match=r"certificate_file graph-cert\.pem: the private key must be RSA"
        ):
            _run(src, tmp_path)
        assert not [r for r in peer.requests if r.method == "POST"]  # refused before asking for a token

    def test_forwarding_and_redirect_rules_become_forwarding_rules(
        self, peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        now = dt.datetime(2026, 11, 24, 9, 0, tzinfo=dt.UTC)

        rules = forwarding_rules_graph(source(peer, tmp_path, tls), base=tmp_path, now=now)

        assert [(r.name, r.targets, r.action, r.enabled) for r in rules] == [
            ("Everything to my gmail", ("jane.smith77@gmail.com",), "forward", True),
            ("Parents to home", ("jane@home.example.org",), "redirect", False),
        ]
        assert {(r.source, r.mailbox, r.seen_at) for r in rules} == {("m365", MAILBOX, now)}
