"""The Microsoft Graph source against a local HTTPS peer serving recorded, documented responses.

msal and requests do the talking: OpenID discovery, the client-credentials token request, delta
rounds with nextLink/deltaLink, 410 and 429 answers, and inbox rules.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

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

DATA = Path(__file__).resolve().parents[1] / "data" / "graph"
TENANT = "11111111-2222-3333-4444-555555555555"
CLIENT_ID = "00000000-0000-0000-0000-0000000000a1"
SECRET = "s3cr3t~value"
MAILBOX = "jane.smith@choysez.org.uk"


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    form: dict[str, list[str]] = field(default_factory=dict)


class GraphPeer:
    """State of the fake Entra ID + Graph service: what it was asked, and what to answer next."""

    def __init__(self) -> None:
        self.base = ""
        self.requests: list[Seen] = []
        self.throttle: list[str] = []  # Retry-After values to answer delta requests with, first first
        self.thumbprint: str | None = None  # the x5t a certificate assertion must carry

    def render(self, name: str, **extra: str) -> bytes:
        text = (DATA / name).read_text(encoding="utf-8")
        for key, value in {"base": self.base, "tenant": TENANT, "mailbox": MAILBOX, **extra}.items():
            text = text.replace("{" + key + "}", value)
        return text.encode()

    def deltas(self) -> list[Seen]:
        return [r for r in self.requests if r.path.endswith("/messages/delta")]


def _handler(peer: GraphPeer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; odata.metadata=minimal")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _seen(self, form: dict[str, list[str]] | None = None) -> Seen:
            parts = urlsplit(self.path)
            seen = Seen(
                self.command, unquote(parts.path), parse_qs(parts.query), dict(self.headers), form or {}
            )
            peer.requests.append(seen)
            return seen

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = parse_qs(self.rfile.read(length).decode())
            seen = self._seen(form)
            if seen.path != f"/{TENANT}/oauth2/v2.0/token":
                self._send(404, b"{}")
                return
            if form.get("client_secret") == [SECRET]:
                self._send(200, peer.render("token.json"))
                return
            assertion = form.get("client_assertion", [""])[0]
            if assertion and peer.thumbprint is not None:
                header = json.loads(base64.urlsafe_b64decode(assertion.split(".")[0] + "=="))
                if str(header.get("x5t", "")).rstrip("=") == peer.thumbprint:
                    self._send(200, peer.render("token.json"))
                    return
            self._send(401, peer.render("token-invalid-client.json"))

        def do_GET(self) -> None:
            seen = self._seen()
            if seen.path == f"/{TENANT}/v2.0/.well-known/openid-configuration":
                self._send(200, peer.render("openid-configuration.json"))
                return
            if not seen.headers.get("Authorization", "").startswith("Bearer eyJ"):
                self._send(401, b'{"error":{"code":"InvalidAuthenticationToken","message":"empty token"}}')
                return
            prefix = f"/v1.0/users/{MAILBOX}/mailFolders/"
            if not seen.path.startswith(prefix):
                self._send(404, peer.render("error-mailbox-not-found.json"))
                return
            rest = seen.path[len(prefix) :]
            folder = rest.split("/", 1)[0]
            if rest == "inbox/messageRules":
                self._send(200, peer.render("message-rules.json"))
            elif rest.endswith("/messages/delta"):
                self._delta(seen, folder)
            elif "/" not in rest:
                self._send(200, json.dumps({"id": "AAMkFolder=", "displayName": folder}).encode())
            else:
                self._send(404, b'{"error":{"code":"ErrorItemNotFound","message":"not found"}}')

        def _delta(self, seen: Seen, folder: str) -> None:
            if peer.throttle:
                retry_after = peer.throttle.pop(0)
                self._send(429, peer.render("error-throttled.json"), {"Retry-After": retry_after})
                return
            skip = seen.query.get("$skiptoken", [""])[0]
            delta = seen.query.get("$deltatoken", [""])[0]
            if skip == "SKIP1":
                self._send(200, peer.render("delta-page2.json", folder=folder))
            elif delta in ("DELTA1", "DELTA2"):
                self._send(200, peer.render("delta-empty.json", folder=folder))
            elif skip or delta:
                self._send(410, peer.render("error-sync-state-not-found.json"))
            else:
                self._send(200, peer.render("delta-page1.json", folder=folder))

    return Handler


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp / "server.pem", tmp / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def peer(tls: tuple[Path, Path]) -> Iterator[GraphPeer]:
    state = GraphPeer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls[0]), str(tls[1]))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    state.base = f"https://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def _source(peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path], **over: Any) -> GraphSource:
    (tmp_path / "graph-secret").write_text(SECRET + "\n")
    data: dict[str, Any] = {
        "name": "m365",
        "type": "graph",
        "tenant_id": TENANT,
        "client_id": CLIENT_ID,
        "client_secret_file": "graph-secret",
        "mailboxes": [MAILBOX],
        "folders": ["inbox"],
        "graph_url": f"{peer.base}/v1.0",
        "authority": f"{peer.base}/{{tenant_id}}",
        "ca_file": str(tls[0]),
        **over,
    }
    return GraphSource.model_validate(data)


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
        messages, updates, saved = _run(_source(peer, tmp_path, tls), tmp_path)

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
        src = _source(peer, tmp_path, tls)
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

        messages, updates, saved = _run(_source(peer, tmp_path, tls), tmp_path, stale)

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

        messages, _, saved = _run(_source(peer, tmp_path, tls), tmp_path, part_way)

        assert [m.subject for m in messages] == ["Rota for next week"]
        assert saved[key].endswith("$deltatoken=DELTA1")


class TestThrottlingAndErrors:
    """429 waits as told within a bound; credentials failures are one clear line without the secret."""

    def test_429_with_retry_after_is_waited_for_then_retried(
        self, peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        peer.throttle = ["1"]
        started = time.monotonic()

        messages, _, _ = _run(_source(peer, tmp_path, tls), tmp_path)

        assert time.monotonic() - started >= 1.0
        assert len(messages) == 3
        assert len(peer.deltas()) == 3  # the throttled request, its retry, the second page

    def test_a_retry_after_beyond_the_bound_fails_the_pass_at_once(
        self, peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        peer.throttle = ["120"]
        started = time.monotonic()
        with pytest.raises(SourceError, match=r"throttled .*Retry-After 120 s.*max_wait_seconds = 5") as exc:
            _run(_source(peer, tmp_path, tls, max_wait_seconds=5), tmp_path)
        assert time.monotonic() - started < 5
        assert exc.value.where == "m365"

    def test_a_wrong_client_secret_is_one_line_naming_the_aadsts_code(
        self, peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        src = _source(peer, tmp_path, tls)
        (tmp_path / "graph-secret").write_text("wrong-secret-value")

        with pytest.raises(SourceError) as exc:
            _run(src, tmp_path)

        assert str(exc.value) == "m365: cannot get a token: AADSTS7000215 invalid client secret provided"
        assert "wrong-secret-value" not in str(exc.value)

    def test_probe_passes_for_a_known_mailbox_and_names_an_unknown_one(
        self, peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        probe_graph(_source(peer, tmp_path, tls), tmp_path)
        with pytest.raises(SourceError, match=r"nobody@choysez.org.uk/inbox: HTTP 404 .*ErrorInvalidUser"):
            probe_graph(_source(peer, tmp_path, tls, mailboxes=["nobody@choysez.org.uk"]), tmp_path)

    def test_an_unreadable_mailbox_does_not_stop_the_others(
        self, peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        src = _source(peer, tmp_path, tls, mailboxes=["nobody@choysez.org.uk", MAILBOX])
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

        src = _source(peer, tmp_path, tls, client_secret_file=None, certificate_file="graph-cert.pem")
        messages, _, _ = _run(src, tmp_path)

        assert len(messages) == 3
        token_request = next(r for r in peer.requests if r.method == "POST")
        assert token_request.form["client_assertion_type"] == [
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        ]
        assert token_request.form["scope"] == [f"{peer.base}/.default"]

    def test_forwarding_and_redirect_rules_become_forwarding_rules(
        self, peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        now = dt.datetime(2026, 11, 24, 9, 0, tzinfo=dt.UTC)

        rules = forwarding_rules_graph(_source(peer, tmp_path, tls), base=tmp_path, now=now)

        assert [(r.name, r.targets, r.action, r.enabled) for r in rules] == [
            ("Everything to my gmail", ("jane.smith77@gmail.com",), "forward", True),
            ("Parents to home", ("jane@home.example.org",), "redirect", False),
        ]
        assert {(r.source, r.mailbox, r.seen_at) for r in rules} == {("m365", MAILBOX, now)}
