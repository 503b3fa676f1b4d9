"""A local Entra ID + Graph peer for the tests: HTTPS on 127.0.0.1 answering with recorded responses
(tests/data/graph, provenance in its README), and a source configured for it."""

from __future__ import annotations

import base64
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from auditd.config import GraphSource
from tests.certs import self_signed as make_certificate

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


def handler(peer: GraphPeer) -> type[BaseHTTPRequestHandler]:
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


def self_signed(tmp: Path) -> tuple[Path, Path]:
    return make_certificate(tmp, "server")


@contextmanager
def serve(tls: tuple[Path, Path]) -> Iterator[GraphPeer]:
    """A running peer with the certificate `tls` (from `self_signed`)."""
    state = GraphPeer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(state))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls[0]), str(tls[1]))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    state.base = f"https://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def source(peer: GraphPeer, tmp_path: Path, tls: tuple[Path, Path], **over: Any) -> GraphSource:
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
