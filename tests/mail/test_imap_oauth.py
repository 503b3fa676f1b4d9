"""XOAUTH2 logins against a real Dovecot that checks each token with a local introspection service.

Dovecot's oauth2 passdb POSTs `token=...` to the introspection URL (RFC 7662) and lets the login in
only when the answer says `active` and names the user. The client-credentials flow gets its token
from the local Entra ID peer of the Graph tests (HTTPS, a throwaway CA), and that token is the one
the introspection service accepts: a login that works proves the token went from msal to Dovecot.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import threading
from collections.abc import Iterator
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from auditd.config import ImapSource
from auditd.errors import SourceError
from auditd.model import MailMessage
from auditd.sources.imap import Meter, Tuning, probe_imap, read_imap
from auditd.sources.mailfile import MailStats
from tests.mail.dovecot import Dovecot, available, free_port
from tests.mail.graph_peer import CLIENT_ID, DATA, SECRET, TENANT, GraphPeer, self_signed, serve

FAST = Tuning(backoff=0.05, connect_timeout=5, read_timeout=10)
# the access token the Graph peer's token endpoint hands out (tests/data/graph/token.json)
ISSUED = json.loads((DATA / "token.json").read_text())["access_token"]


class Introspection:
    """A token introspection endpoint on 127.0.0.1: active, as user `audit`, only for `tokens`."""

    def __init__(self) -> None:
        self.tokens: set[str] = set()
        self.seen: list[str] = []  # tokens Dovecot asked about, in order
        introspection = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode())
                token = form.get("token", [""])[0]
                introspection.seen.append(token)
                answer = {"active": True, "username": "audit"} if token in introspection.tokens else {}
                body = json.dumps(answer or {"active": False}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/introspect"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def introspection() -> Iterator[Introspection]:
    service = Introspection()
    try:
        yield service
    finally:
        service.close()


def _start(introspection: Introspection) -> Dovecot:
    if not available():
        pytest.skip("Dovecot is not installed (/usr/sbin/dovecot; Debian package dovecot-imapd)")
    return Dovecot(oauth2_introspection=introspection.url).start()


@pytest.fixture(scope="module")
def oauth_server(introspection: Introspection) -> Iterator[Dovecot]:
    server = _start(introspection)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def oauth_dovecot(oauth_server: Dovecot, introspection: Introspection) -> Dovecot:
    """The module's OAuth Dovecot, an empty mailbox, and no token accepted yet."""
    oauth_server.reset_mailbox()
    introspection.tokens.clear()
    introspection.seen.clear()
    return oauth_server


@pytest.fixture
def lone_oauth_dovecot(introspection: Introspection) -> Iterator[Dovecot]:
    """One for a refused login: Dovecot then slows every login from 127.0.0.1 by seconds."""
    introspection.tokens.clear()
    introspection.seen.clear()
    server = _start(introspection)
    try:
        yield server
    finally:
        server.stop(fast=True)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def entra(tls: tuple[Path, Path]) -> Iterator[GraphPeer]:
    with serve(tls) as running:
        yield running


def deliver(server: Dovecot, *subjects: str) -> None:
    c = server.client()
    try:
        for n, subject in enumerate(subjects):
            m = EmailMessage()
            m["From"] = "parent@example.net"
            m["To"] = "jane.smith@choysez.org.uk"
            m["Subject"] = subject
            m["Message-ID"] = f"<oauth{n}@example.net>"
            m["Date"] = "Fri, 20 Nov 2026 16:02:11 +0000"
            m.set_content("Can Sam come to the trip on Friday?")
            c.append("INBOX", m.as_bytes())
    finally:
        c.logout()


def imap_source(server: Dovecot, **login: Any) -> ImapSource:
    fields: dict[str, Any] = {
        "name": "m365-imap",
        "type": "imap",
        "host": server.host,
        "port": server.port,
        "tls": False,
        "username": server.user,
        **login,
    }
    return ImapSource.model_validate(fields)


def client_credentials(
    server: Dovecot,
    entra: GraphPeer,
    tmp_path: Path,
    tls: tuple[Path, Path],
    secret: str = SECRET,
    **over: Any,
) -> ImapSource:
    (tmp_path / "imap-oauth-secret").write_text(secret + "\n")
    login: dict[str, Any] = {
        "oauth_client_id": CLIENT_ID,
        "oauth_tenant_id": TENANT,
        "oauth_client_secret_file": "imap-oauth-secret",
        "oauth_authority": f"{entra.base}/{{tenant_id}}",
        "oauth_ca_file": str(tls[0]),
        **over,
    }
    return imap_source(server, **login)


def scan(src: ImapSource, base: Path) -> tuple[list[MailMessage], Meter]:
    meter = Meter()
    found = [
        m for m, _ in read_imap(src, base=base, previous={}, stats=MailStats(), tuning=FAST, meter=meter)
    ]
    return found, meter


def xoauth2_logins(server: Dovecot) -> int:
    return server.log_text().count("Login: user=<audit>, method=XOAUTH2")


class TestTokenFile:
    """A bearer token kept in a file logs in with XOAUTH2, and Dovecot checked it."""

    def test_token_file_logs_in_and_a_scan_reads_the_mail(
        self, oauth_dovecot: Dovecot, introspection: Introspection, tmp_path: Path
    ) -> None:
        deliver(oauth_dovecot, "Trip on Friday", "Consent form")
        introspection.tokens.add("ya29.a0-token-from-a-file")
        (tmp_path / "imap-token").write_text("ya29.a0-token-from-a-file\n")
        before = xoauth2_logins(oauth_dovecot)

        messages, meter = scan(imap_source(oauth_dovecot, oauth_token_file="imap-token"), tmp_path)

        assert sorted(m.subject for m in messages) == ["Consent form", "Trip on Friday"]
        assert introspection.seen == ["ya29.a0-token-from-a-file"]
        assert xoauth2_logins(oauth_dovecot) == before + 1
        assert meter.connections == 1


class TestClientCredentials:
    """The client-credentials flow: msal gets an app-only token that Dovecot accepts."""

    def test_flow_token_logs_in_and_a_scan_reads_the_mail(
        self,
        oauth_dovecot: Dovecot,
        introspection: Introspection,
        entra: GraphPeer,
        tmp_path: Path,
        tls: tuple[Path, Path],
    ) -> None:
        deliver(oauth_dovecot, "Trip on Friday")
        introspection.tokens.add(ISSUED)

        messages, _ = scan(client_credentials(oauth_dovecot, entra, tmp_path, tls), tmp_path)

        assert [m.subject for m in messages] == ["Trip on Friday"]
        assert introspection.seen == [ISSUED]
        (token_request,) = [r for r in entra.requests if r.method == "POST"]
        assert token_request.path == f"/{TENANT}/oauth2/v2.0/token"
        assert token_request.form["grant_type"] == ["client_credentials"]
        assert token_request.form["client_id"] == [CLIENT_ID]
        assert token_request.form["scope"] == ["https://outlook.office365.com/.default"]

    def test_certificate_credential_sends_an_assertion_and_logs_in(
        self,
        oauth_dovecot: Dovecot,
        introspection: Introspection,
        entra: GraphPeer,
        tmp_path: Path,
        tls: tuple[Path, Path],
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
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (tmp_path / "imap-oauth-cert.pem").write_bytes(pem)
        digest = hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).digest()
        entra.thumbprint = base64.urlsafe_b64encode(digest).decode().rstrip("=")
        introspection.tokens.add(ISSUED)
        src = client_credentials(
            oauth_dovecot,
            entra,
            tmp_path,
            tls,
            oauth_client_secret_file=None,
            oauth_certificate_file="imap-oauth-cert.pem",
        )

        probe_imap(src, tmp_path, FAST)

        (token_request,) = [r for r in entra.requests if r.method == "POST"]
        assert "client_secret" not in token_request.form
        assert token_request.form["client_assertion_type"] == [
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        ]
        assert introspection.seen == [ISSUED]

    def test_certificate_with_a_non_rsa_key_is_one_line(
        self, oauth_dovecot: Dovecot, entra: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
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
        (tmp_path / "ec.pem").write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        src = client_credentials(
            oauth_dovecot,
            entra,
            tmp_path,
            tls,
            oauth_client_secret_file=None,
            oauth_certificate_file="ec.pem",
        )

        with pytest.raises(
            SourceError, match=r"^m365-imap: oauth_certificate_file ec\.pem: the private key must be RSA"
        ):
            probe_imap(src, tmp_path, FAST)

    def test_probe_logs_in_with_a_flow_token(
        self,
        oauth_dovecot: Dovecot,
        introspection: Introspection,
        entra: GraphPeer,
        tmp_path: Path,
        tls: tuple[Path, Path],
    ) -> None:
        introspection.tokens.add(ISSUED)
        before = xoauth2_logins(oauth_dovecot)

        probe_imap(client_credentials(oauth_dovecot, entra, tmp_path, tls), tmp_path, FAST)

        assert xoauth2_logins(oauth_dovecot) == before + 1

    def test_wrong_client_secret_is_one_line_naming_the_aadsts_code_without_the_secret(
        self,
        oauth_dovecot: Dovecot,
        introspection: Introspection,
        entra: GraphPeer,
        tmp_path: Path,
        tls: tuple[Path, Path],
    ) -> None:
        src = client_credentials(oauth_dovecot, entra, tmp_path, tls, secret="wr0ng~secret-value")

        with pytest.raises(SourceError) as err:
            scan(src, tmp_path)

        message = str(err.value)
        assert message == "m365-imap: cannot get a token: AADSTS7000215 invalid client secret provided"
        assert "wr0ng" not in message
        assert introspection.seen == []  # Dovecot was never asked

    def test_untrusted_authority_certificate_is_refused(
        self, oauth_dovecot: Dovecot, entra: GraphPeer, tmp_path: Path, tls: tuple[Path, Path]
    ) -> None:
        src = client_credentials(oauth_dovecot, entra, tmp_path, tls, oauth_ca_file=None)

        with pytest.raises(
            SourceError, match=r"^m365-imap: cannot reach the authority https://127\.0\.0\.1:\d+/"
        ):
            scan(src, tmp_path)

        assert entra.requests == []  # TLS failed before any request was read

    def test_unreachable_authority_is_one_line(self, oauth_dovecot: Dovecot, tmp_path: Path) -> None:
        (tmp_path / "imap-oauth-secret").write_text(SECRET)
        src = imap_source(
            oauth_dovecot,
            oauth_client_id=CLIENT_ID,
            oauth_tenant_id=TENANT,
            oauth_client_secret_file="imap-oauth-secret",
            oauth_authority=f"https://127.0.0.1:{free_port()}/{{tenant_id}}",
        )

        with pytest.raises(SourceError) as err:
            scan(src, tmp_path)

        assert str(err.value).startswith(f"m365-imap: cannot reach the authority {src.oauth_authority_url}: ")
        assert "\n" not in str(err.value)
        assert SECRET not in str(err.value)


class TestRefusedToken:
    """A token Dovecot's introspection calls inactive (expired, revoked, unknown) is a login failure."""

    def test_expired_token_is_refused_with_the_servers_words(
        self, lone_oauth_dovecot: Dovecot, introspection: Introspection, tmp_path: Path
    ) -> None:
        (tmp_path / "imap-token").write_text("expired-token-value\n")

        with pytest.raises(SourceError) as err:
            scan(imap_source(lone_oauth_dovecot, oauth_token_file="imap-token"), tmp_path)

        message = str(err.value)
        assert message == "m365-imap: cannot log in as audit: [AUTHENTICATIONFAILED] Authentication failed."
        assert introspection.seen == ["expired-token-value"]  # Dovecot asked, and was told no
        assert "expired-token-value" not in message


class TestConfig:
    """Exactly one way to log in; the client-credentials flow is complete and over https."""

    BASE: dict[str, Any] = {"name": "m", "type": "imap", "host": "outlook.office365.com", "username": "a@b.c"}
    FLOW: dict[str, Any] = {
        "oauth_client_id": CLIENT_ID,
        "oauth_tenant_id": TENANT,
        "oauth_client_secret_file": "s",
    }

    def test_flow_defaults_are_exchange_online(self) -> None:
        src = ImapSource.model_validate({**self.BASE, **self.FLOW})
        assert src.oauth_authority_url == f"https://login.microsoftonline.com/{TENANT}"
        assert src.oauth_scope == "https://outlook.office365.com/.default"

    @pytest.mark.parametrize(
        ("fields", "expected"),
        [
            ({}, "set one way to log in: password_file, oauth_token_file, or oauth_client_id"),
            ({"password_file": "p", "oauth_token_file": "t"}, "not password_file and oauth_token_file"),
            ({"password_file": "p", **FLOW}, "not password_file and oauth_client_id"),
            ({"oauth_client_id": CLIENT_ID, "oauth_tenant_id": TENANT}, "exactly one of oauth_client_secret"),
            ({**FLOW, "oauth_certificate_file": "c"}, "exactly one of oauth_client_secret_file"),
            ({**FLOW, "oauth_tenant_id": None}, "oauth_client_id needs oauth_tenant_id"),
            ({**FLOW, "oauth_authority": "http://login.example/{tenant_id}"}, "must be an https:// URL"),
            ({"password_file": "p", "oauth_client_secret_file": "s"}, "set oauth_client_id too"),
        ],
    )
    def test_mistakes_are_named(self, fields: dict[str, Any], expected: str) -> None:
        with pytest.raises(ValidationError, match=expected):
            ImapSource.model_validate({**self.BASE, **fields})
