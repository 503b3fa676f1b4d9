"""A local EWS peer for the tests: a SOAP server on 127.0.0.1 answering with recorded responses
(tests/data/ews, provenance in its README), and a source configured for it."""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from auditd.config import EwsSource

DATA = Path(__file__).resolve().parents[1] / "data" / "ews"
M = "{http://schemas.microsoft.com/exchange/services/2006/messages}"
T = "{http://schemas.microsoft.com/exchange/services/2006/types}"
S = "{http://schemas.xmlsoap.org/soap/envelope/}"
MAILBOX = "jane.smith@choysez.org.uk"
STATE1 = (  # as in syncfolderitems-page1.xml
    "H4sIAAAAAAAEAO29B2AcSZYlJi9tynt/SvVK1+B0oQiAYBMk2JBAEOzBiM3mkuwdaUcjKasqgcplVmVdZhZAzO2dvPfee++999577733PPPPSSg1"
)
STATE2 = STATE1[:-1] + "2"


@dataclass
class Call:
    operation: str
    headers: dict[str, str]
    body: str
    envelope: ET.Element


class EwsPeer:
    """The fake Exchange server's record of calls and what it should answer next."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.busy = 0  # SyncFolderItems requests to answer with ErrorServerBusy first
        self.unknown_mailboxes: set[str] = set()

    def ops(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.operation == name]


def _render(name: str, **values: str) -> bytes:
    text = (DATA / name).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text.encode()


def _get_items(ids: list[str]) -> bytes:
    """The recorded GetItem response cut down to the requested items, in the order asked."""
    root = ET.fromstring((DATA / "getitem.xml").read_bytes())
    messages = root.find(f"{S}Body/{M}GetItemResponse/{M}ResponseMessages")
    assert messages is not None
    by_id = {m.find(f"{M}Items/{T}Message/{T}ItemId").get("Id"): m for m in list(messages)}  # type: ignore[union-attr]
    for m in list(messages):
        messages.remove(m)
    for i in ids:
        messages.append(by_id[i])
    return b'<?xml version="1.0" encoding="utf-8"?>' + ET.tostring(root)


def handler(peer: EwsPeer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/xml; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            env = ET.fromstring(raw)
            body = env.find(f"{S}Body")
            assert body is not None
            op = body[0].tag.split("}")[1]
            peer.calls.append(Call(op, dict(self.headers), raw.decode(), env))
            impersonated = env.findtext(f".//{T}ExchangeImpersonation/{T}ConnectingSID/{T}PrimarySmtpAddress")
            if impersonated in peer.unknown_mailboxes:
                self._send(500, _render("error-impersonate-denied.xml"))
            elif op == "ConvertId":
                self._send(200, _render("convertid.xml"))
            elif op == "GetFolder":
                fid = env.find(f".//{T}DistinguishedFolderId")
                name = fid.get("Id", "") if fid is not None else "folder"
                self._send(200, _render("getfolder.xml", folder=name, display=name.title()))
            elif op == "SyncFolderItems":
                if peer.busy:
                    peer.busy -= 1
                    self._send(500, _render("server-busy.xml", backoff="1000"))
                    return
                state = env.findtext(f".//{M}SyncState")
                page = {None: "page1", STATE1: "page2", STATE2: "nochanges"}.get(state, "invalid-state")
                self._send(200, _render(f"syncfolderitems-{page}.xml"))
            elif op == "GetItem":
                self._send(200, _get_items([e.get("Id", "") for e in env.iter(f"{T}ItemId")]))
            elif op == "GetInboxRules":
                self._send(200, _render("getinboxrules.xml"))
            else:
                self._send(500, b"")

    return Handler


@contextmanager
def serve() -> Iterator[tuple[EwsPeer, str]]:
    """A running peer and its endpoint URL."""
    state = EwsPeer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/EWS/Exchange.asmx"
    finally:
        server.shutdown()
        server.server_close()


def source(url: str, tmp_path: Path, **over: Any) -> EwsSource:
    (tmp_path / "ews-password").write_text("Pa55word!\n")
    data: dict[str, Any] = {
        "name": "exchange",
        "type": "ews",
        "server": url,
        "username": "CHOYSEZ\\svc-audit",
        "password_file": "ews-password",
        "mailboxes": [MAILBOX],
        "folders": ["inbox"],
        "auth": "basic",
        "max_wait_seconds": 10,
        **over,
    }
    return EwsSource.model_validate(data)
