"""Mail from an IMAP server, strictly read-only.

An audit must not change what staff see, so folders are opened with EXAMINE and every body is
fetched with BODY.PEEK: no message is marked as read. Only what the rules need crosses the wire:
the header block, BODYSTRUCTURE, RFC822.SIZE, and the text parts (plain and HTML, each cut at
`Tuning.part_cap` bytes by a partial fetch), never an attachment. Forwarded messages' headers and
text parts come too. The pieces are put back together as a stand-in message and parsed by
`mailfile.parse_message`, so IMAP mail is decoded exactly as mail read from files.

Each folder is checkpointed as `UIDVALIDITY:LASTUID`; the next pass fetches only newer UIDs, and a
changed UIDVALIDITY (the folder was recreated) means a full rescan of that folder. A connection that
drops mid-scan is reopened with back-off a bounded number of times, resuming after the last message
handed out. TLS (port 993) is verified against the system's CAs; plain IMAP is for loopback only
(the config enforces it). Secrets come from `password_file`, `oauth_token_file` (XOAUTH2), or the
OAuth client-credentials flow (`oauth_client_id`, XOAUTH2 with a token fetched for each connection,
see `auditd.sources.oauth`), and never appear in an error.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import imaplib
import itertools
import queue
import re
import ssl
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from imapclient import IMAPClient, SocketTimeout
from imapclient.exceptions import IMAPClientError, LoginError

from auditd.config import ImapSource, read_secret
from auditd.errors import SourceError
from auditd.model import ForwardingRule, MailMessage
from auditd.sources.mailfile import MailStats, from_email
from auditd.sources.oauth import ClientCredentials, imap_credentials

TEXT_TYPES = frozenset({"plain", "html"})
HEADER_CAP = 128 * 1024  # bytes of a message's header block fetched
NESTED_HEADER_CAP = 16 * 1024  # ... and of a forwarded message's
MAX_WANTED_PARTS = 12  # text parts and forwarded headers per message: bounded for a hostile one

# What a dropped or broken connection raises: socket and TLS errors, and imaplib's abort.
_DROPPED = (OSError, imaplib.IMAP4.abort)


@dataclass(frozen=True)
class Tuning:
    """Knobs with sensible defaults; tests and the benchmark shorten the waits."""

    batch: int = 200  # UIDs per FETCH
    part_cap: int = 256 * 1024  # bytes of one text part fetched (a partial fetch <0.cap>)
    batch_bytes: int = 8 * 1024 * 1024  # text bytes asked for in one FETCH, bounding memory
    connect_timeout: float = 15.0
    read_timeout: float = 120.0
    attempts: int = 4  # connections tried per folder before giving up (after a drop)
    backoff: float = 2.0  # seconds before the first retry, doubled each time


@dataclass
class Meter:
    """What a pass asked of the server: lets tests and the benchmark prove it stays small."""

    connections: int = 0
    fetches: int = 0
    messages: int = 0
    bytes: int = 0  # header and text bytes received
    mailbox_bytes: int = 0  # the whole size of the messages read (RFC822.SIZE): what was not fetched
    reconnects: int = 0
    folders: dict[str, int] = field(default_factory=dict)  # messages handed out per folder
    read_only: dict[str, bool] = field(default_factory=dict)  # did the server confirm [READ-ONLY]?


@dataclass(frozen=True)
class Part:
    """One node of a message's MIME tree as BODYSTRUCTURE describes it (no content).

    `section` is the IMAP section spec ("1.2"); a multipart's children, or the one body of an
    encapsulated message/rfc822, are in `children`. `fetch` marks a text part to download.
    """

    section: str
    maintype: str
    subtype: str
    charset: str = ""
    encoding: str = ""
    size: int = 0
    disposition: str = ""
    children: tuple[Part, ...] = ()
    fetch: bool = False

    def wanted(self) -> list[Part]:
        """Text parts to download and encapsulated messages (whose header is downloaded), in order."""
        here = [self] if self.fetch or self.maintype == "message" else []
        return here + [p for c in self.children for p in c.wanted()]


# ---- BODYSTRUCTURE ----------------------------------------------------------------------------


def _s(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return value if isinstance(value, str) else ""


def _params(value: object) -> dict[str, str]:
    if not isinstance(value, (tuple, list)):
        return {}
    items = list(value)
    return {_s(k).lower(): _s(v) for k, v in zip(items[::2], items[1::2], strict=False)}


def _disposition(part: Sequence[Any], index: int) -> str:
    if len(part) > index and isinstance(part[index], (tuple, list)) and part[index]:
        return _s(part[index][0]).lower()
    return ""


def _multipart(structure: object) -> bool:
    return isinstance(structure, (tuple, list)) and bool(structure) and isinstance(structure[0], tuple | list)


def _token(value: str) -> str:
    """A MIME type, subtype, charset or encoding safe to write back into a header."""
    return re.sub(r"[^\w.+-]", "", value)[:64].lower()


def parse_structure(structure: Any, prefix: str = "", depth: int = 0) -> Part:
    """The MIME tree of a BODYSTRUCTURE, marking which text parts to fetch.

    Section numbers follow RFC 3501: a multipart's children are numbered from 1, and the body of
    a single-part message (top level or encapsulated in message/rfc822) is part 1. Text parts of
    forwarded messages are fetched too: what was forwarded matters. A text part that is an
    attachment inside a multipart is not.
    """
    section = prefix or "1"
    if not isinstance(structure, (tuple, list)) or not structure or depth > 20:
        return Part(section, "application", "octet-stream")
    if _multipart(structure):  # (part part ... subtype params disposition ...), as sent
        parts = list(itertools.takewhile(lambda x: isinstance(x, (tuple, list)), structure))
        children = tuple(
            parse_structure(child, f"{prefix}.{n}" if prefix else str(n), depth + 1)
            for n, child in enumerate(parts, 1)
        )
        subtype = _token(_s(structure[len(parts)])) if len(structure) > len(parts) else ""
        return Part(prefix, "multipart", subtype or "mixed", children=children)
    maintype = _token(_s(structure[0])) or "application"
    subtype = _token(_s(structure[1])) if len(structure) > 1 else ""
    size = structure[6] if len(structure) > 6 and isinstance(structure[6], int) else 0
    encoding = _token(_s(structure[5])) if len(structure) > 5 else ""
    charset = _token(_params(structure[2]).get("charset", "")) if len(structure) > 2 else ""
    if maintype == "message" and subtype in ("rfc822", "global") and len(structure) > 8:
        # type, subtype, params, id, description, encoding, size, envelope, body, lines, md5, disposition
        nested = structure[8]
        body = parse_structure(nested, section if _multipart(nested) else f"{section}.1", depth + 1)
        return Part(section, maintype, subtype, disposition=_disposition(structure, 11), children=(body,))
    # text: ..., encoding, size, lines, md5, disposition; other types have no line count
    disposition = _disposition(structure, 9 if maintype == "text" else 8)
    fetch = maintype == "text" and subtype in TEXT_TYPES and not (disposition == "attachment" and depth > 0)
    return Part(section, maintype, subtype or "plain", charset, encoding, size, disposition, fetch=fetch)


# ---- FETCH responses -------------------------------------------------------------------------
# imapclient's response parser reads a character at a time, which made parsing BODYSTRUCTUREs the
# largest cost of a scan; our FETCHes are sent through its imaplib connection and their answers
# tokenised with one regular expression instead. imapclient still connects, logs in, selects.

_TOKEN = re.compile(rb'[()]|"(?:[^"\\]|\\.)*"|\{\d+\+?\}$|[^\s()"]+')
_OPEN, _CLOSE = object(), object()


def _tokens(data: Sequence[Any]) -> Iterator[Any]:
    """Values of an imaplib FETCH answer: parentheses as markers, then bytes, int or None."""
    for item in data:
        if isinstance(item, tuple):  # (text ending in a {n} literal marker, the literal)
            head, literal = item
        elif isinstance(item, bytes):
            head, literal = item, None
        else:
            continue
        for tok in _TOKEN.findall(head):
            if tok == b"(":
                yield _OPEN
            elif tok == b")":
                yield _CLOSE
            elif tok[:1] == b'"':
                yield re.sub(rb"\\(.)", rb"\1", tok[1:-1])
            elif tok[:1] == b"{" and tok[-1:] == b"}" and literal is not None:
                yield literal
            elif tok.isdigit():
                yield int(tok)
            else:
                yield None if tok.upper() == b"NIL" else tok


def parse_fetch(data: Sequence[Any]) -> dict[int, dict[bytes, Any]]:
    """An imaplib `UID FETCH` answer as {uid: {ITEM: value}}; lists for parenthesised values."""
    stack: list[list[Any]] = [[]]
    for tok in _tokens(data):
        if tok is _OPEN:
            stack.append([])
        elif tok is _CLOSE:
            if len(stack) < 2:
                raise IMAPClientError("unbalanced parentheses in a FETCH response")
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(tok)
    if len(stack) != 1:
        raise IMAPClientError("unbalanced parentheses in a FETCH response")
    out: dict[int, dict[bytes, Any]] = {}
    for items in stack[0]:
        if not isinstance(items, list):
            continue  # the message sequence number before each list
        fields = {k.upper(): v for k, v in zip(items[::2], items[1::2], strict=False) if isinstance(k, bytes)}
        uid = fields.get(b"UID")
        if isinstance(uid, int):
            out[uid] = fields
    return out


def _fetch_fast(client: Any, uids: Sequence[int], items: Sequence[bytes]) -> dict[int, dict[bytes, Any]]:
    what = b"(UID " + b" ".join(items) + b")"  # UID FETCH answers carry it anyway (RFC 3501)
    typ, data = client._imap.uid("FETCH", ",".join(map(str, uids)), what.decode())
    if typ != "OK":
        raise IMAPClientError(f"FETCH failed: {data!r}")
    return parse_fetch(data)


def _unbase64_safe(raw: bytes) -> bytes:
    """A base64 part cut short by a partial fetch: keep whole 4-character groups only."""
    compact = bytes(re.sub(rb"[^A-Za-z0-9+/=]", b"", raw))
    return compact[: len(compact) // 4 * 4]


_DROPPED_HEADERS = (b"content-type", b"content-transfer-encoding", b"mime-version", b"content-disposition")


def _header_block(headers: bytes) -> list[bytes]:
    """A fetched header block without its MIME fields (they are written anew) and its blank line."""
    kept: list[bytes] = []
    keep = True
    for line in headers.splitlines(keepends=True):
        if not line.strip():
            break
        if line[:1] not in (b" ", b"\t"):
            keep = line.split(b":", 1)[0].strip().lower() not in _DROPPED_HEADERS
        if keep:
            kept.append(line if line.endswith(b"\n") else line + b"\r\n")
    return kept


def rebuild(headers: bytes, tree: Part, contents: Mapping[str, bytes]) -> email.message.Message:
    """A stand-in for the whole message: its headers, its MIME tree with the fetched text parts in
    place (as the server holds them, perhaps cut short) and every other part empty.

    Built as the email package's own objects, exactly as its parser would leave them, and read by
    `mailfile.from_email`: mail read over IMAP is decoded by the very code that decodes mail read
    from files, alternatives, forwarded messages and all, without parsing every text part again.
    """
    top = _HEADERS.parsebytes(b"".join(_header_block(headers)) + b"\r\n", headersonly=True)
    top["MIME-Version"] = "1.0"
    _fill(top, tree, contents)
    return top


_HEADERS = email.parser.BytesParser(policy=email.policy.compat32)


def _fill(msg: email.message.Message, part: Part, contents: Mapping[str, bytes]) -> None:
    """Give `msg` the type and content of `part` (and its children) as the parser would."""
    if part.disposition:
        msg["Content-Disposition"] = part.disposition
    if part.maintype == "multipart":
        msg["Content-Type"] = f"multipart/{part.subtype}"
        children: list[email.message.Message | str] = []
        for child in part.children:
            sub = email.message.Message()
            _fill(sub, child, contents)
            children.append(sub)
        msg.set_payload(children)
        return
    if part.maintype == "message" and part.children:
        msg["Content-Type"] = f"message/{part.subtype}"
        head = b"".join(_header_block(contents.get(f"{part.section}.HEADER", b"")))
        nested = _HEADERS.parsebytes(head + b"\r\n", headersonly=True)
        nested["MIME-Version"] = "1.0"
        _fill(nested, part.children[0], contents)
        msg.set_payload([nested])
        return
    charset = f'; charset="{part.charset}"' if part.charset and part.maintype == "text" else ""
    msg["Content-Type"] = f"{part.maintype}/{part.subtype}{charset}"
    body = contents.get(part.section, b"") if part.fetch else b""
    if part.fetch and part.encoding:
        msg["Content-Transfer-Encoding"] = part.encoding
        if part.encoding == "base64":
            body = _unbase64_safe(body)
    # as BytesParser keeps a body: ASCII, with other bytes as surrogates
    msg.set_payload(body.decode("ascii", "surrogateescape"))


# ---- checkpoints ------------------------------------------------------------------------------


def folder_key(folder: str) -> str:
    return f"folder:{folder}"


def parse_checkpoint(value: str | None) -> tuple[int, int]:
    """`UIDVALIDITY:LASTUID` as numbers; anything else (absent, garbled) means from the start."""
    if value:
        validity, _, last = value.partition(":")
        if validity.isdigit() and last.isdigit():
            return int(validity), int(last)
    return 0, 0


def new_uids(found: Sequence[int], last: int) -> list[int]:
    """UIDs after `last`, ascending. `UID SEARCH UID n+1:*` also answers with the highest UID
    when it is <= n (`*` is the highest UID, and a range is unordered), so filter."""
    return sorted(u for u in found if u > last)


# ---- the connection ---------------------------------------------------------------------------


def _server_text(exc: BaseException) -> str:
    """The server's words from an imaplib/imapclient error, without Python's b'...' wrapping."""
    text = str(exc)
    m = re.fullmatch(r"""(?:\w+ command error: BAD )?\[?b(['"])(.*)\1\]?""", text, re.S)
    return (m.group(2) if m else text).strip()


class _Unreachable(SourceError):
    """The server could not be reached or the connection broke before the login completed."""


class _Session:
    """One logged-in connection to a source's server, reopened on demand after a drop."""

    def __init__(self, src: ImapSource, base: Path, tuning: Tuning, meter: Meter) -> None:
        self.src = src
        self.tuning = tuning
        self.meter = meter
        self._flow: ClientCredentials | None = None
        self._secret = ""
        if src.oauth_client_id is not None:
            try:
                self._flow = imap_credentials(src, base)
            except SourceError as exc:
                raise SourceError(exc.message, where=src.name) from None
            self._oauth = True
        elif src.oauth_token_file is not None:
            self._secret = read_secret(src.oauth_token_file, base, "oauth_token_file")
            self._oauth = True
        else:
            assert src.password_file is not None  # the config insists on exactly one way to log in
            self._secret = read_secret(src.password_file, base, "password_file")
            self._oauth = False
        self._client: Any = None

    def _fail(self, message: str, kind: type[SourceError] = SourceError) -> SourceError:
        safe = message.replace(self._secret, "***") if self._secret else message
        return kind(safe, where=self.src.name)

    def _login_secret(self) -> str:
        """The password or token for the next login: with the client-credentials flow, a token
        from msal's cache, or a new one when it nears expiry (a long pass may outlive one)."""
        if self._flow is not None:
            try:
                self._secret = self._flow.token()
            except SourceError as exc:
                raise self._fail(exc.message) from None
        return self._secret

    @property
    def address(self) -> str:
        return f"{self.src.host}:{self.src.port}"

    def client(self) -> Any:
        if self._client is None:
            self._client = self._open()
        return self._client

    def _open(self) -> Any:
        src, t = self.src, self.tuning
        secret = self._login_secret()
        context = ssl.create_default_context() if src.tls else None
        try:
            client = IMAPClient(
                src.host,
                port=src.port,
                ssl=src.tls,
                ssl_context=context,
                timeout=SocketTimeout(connect=t.connect_timeout, read=t.read_timeout),
            )
        except ssl.SSLCertVerificationError as exc:
            raise self._fail(
                f"cannot connect to {self.address}: TLS certificate not trusted ({exc.verify_message})"
            ) from None
        except _DROPPED as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise self._fail(f"cannot connect to {self.address}: {reason}", _Unreachable) from None
        self.meter.connections += 1
        try:
            if self._oauth:
                client.oauth2_login(src.username, secret)
            else:
                client.login(src.username, secret)
        except LoginError as exc:
            _close(client)
            raise self._fail(f"cannot log in as {src.username}: {_server_text(exc)}") from None
        except _DROPPED as exc:
            _close(client)
            reason = str(exc) or type(exc).__name__
            raise self._fail(
                f"connection to {self.address} lost while logging in: {reason}", _Unreachable
            ) from None
        return client

    def drop(self) -> None:
        if self._client is not None:
            _close(self._client, polite=False)
            self._client = None

    def close(self) -> None:
        if self._client is not None:
            _close(self._client)
            self._client = None
        if self._flow is not None:
            self._flow.close()


def _close(client: Any, *, polite: bool = True) -> None:
    try:
        if polite:
            client.logout()
        else:
            client.shutdown()
    except (*_DROPPED, IMAPClientError):
        pass


# ---- reading ----------------------------------------------------------------------------------


def _location(src: ImapSource, folder: str, uid: int) -> str:
    port = "" if src.port == (993 if src.tls else 143) else f":{src.port}"
    return f"imap://{quote(src.username, safe='')}@{src.host}{port}/{folder};UID={uid}"


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _items(part: Part, tuning: Tuning) -> tuple[bytes, str, int]:
    """The FETCH item for a wanted part, the key of its answer, and the bytes it may bring."""
    if part.maintype == "message":
        section = f"{part.section}.HEADER"
        return f"BODY.PEEK[{section}]<0.{NESTED_HEADER_CAP}>".encode(), section, 2048
    cap = tuning.part_cap
    return f"BODY.PEEK[{part.section}]<0.{cap}>".encode(), part.section, min(part.size, cap)


def _fetch_contents(
    client: Any, wanted: dict[int, list[Part]], tuning: Tuning, meter: Meter
) -> dict[int, dict[str, bytes]]:
    """Fetch the wanted parts: one FETCH per part layout, split to bound the bytes asked for."""
    by_layout: dict[tuple[bytes, ...], list[int]] = {}
    for uid, parts in wanted.items():
        if parts:
            by_layout.setdefault(tuple(_items(p, tuning)[0] for p in parts), []).append(uid)
    contents: dict[int, dict[str, bytes]] = {uid: {} for uid in wanted}
    for items, uids in by_layout.items():
        group: list[int] = []
        budget = 0
        for uid in [*uids, -1]:
            cost = sum(_items(p, tuning)[2] for p in wanted[uid]) if uid >= 0 else 0
            if group and (uid < 0 or budget + cost > tuning.batch_bytes):
                response = _fetch_fast(client, group, items)
                meter.fetches += 1
                for got in group:
                    data = response.get(got, {})
                    for part in wanted[got]:
                        key = _items(part, tuning)[1]
                        raw = _answer(data, key)
                        meter.bytes += len(raw)
                        contents[got][key] = raw
                group, budget = [], 0
            if uid >= 0:
                group.append(uid)
                budget += cost
    return contents


def _answer(data: Mapping[bytes, Any], section: str) -> bytes:
    """What the server sent for `BODY.PEEK[section]<0.n>`: RFC 3501 keys the answer without PEEK
    (`BODY[section]<0>`). Only the request says PEEK, and the request is what leaves flags alone."""
    got = data.get(f"BODY[{section}]<0>".encode())
    return got if isinstance(got, bytes) else b""


@dataclass
class _Fetched:
    """What the server gave for one UID, not yet parsed; `problem` when it could not describe it."""

    uid: int
    header: bytes = b""
    tree: Part | None = None
    contents: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None


def _download(client: Any, uids: Sequence[int], tuning: Tuning, meter: Meter) -> list[_Fetched]:
    """Headers, structure and text parts of some UIDs: two FETCHes (or a few more), no parsing."""
    heads = [b"RFC822.SIZE", b"BODYSTRUCTURE", f"BODY.PEEK[HEADER]<0.{HEADER_CAP}>".encode()]
    try:
        response = _fetch_fast(client, uids, heads)
        meter.fetches += 1
    except _DROPPED:
        raise
    except IMAPClientError as exc:
        if len(uids) == 1:
            return [_Fetched(uids[0], problem=f"the server could not describe it: {_server_text(exc)}")]
        # one odd message must not cost its neighbours: ask for them one by one
        return [f for uid in uids for f in _download(client, [uid], tuning, meter)]
    out: list[_Fetched] = []
    for uid in uids:
        data = response.get(uid)
        if data is None:
            continue  # expunged since the search
        header = _answer(data, "HEADER")
        meter.bytes += len(header)
        size = data.get(b"RFC822.SIZE")
        meter.mailbox_bytes += size if isinstance(size, int) else 0
        out.append(_Fetched(uid, header, parse_structure(data.get(b"BODYSTRUCTURE"))))
    wanted = {f.uid: f.tree.wanted()[:MAX_WANTED_PARTS] for f in out if f.tree is not None}
    contents = _fetch_contents(client, wanted, tuning, meter)
    for f in out:
        f.contents = contents.get(f.uid, {})
    return out


_T = TypeVar("_T")


def _ahead(items: Iterator[_T], depth: int = 2) -> Iterator[_T]:
    """`items`, produced by a thread up to `depth` ahead of the consumer.

    The network side (and Dovecot working out structures) then overlaps with parsing here. Only
    the thread touches the connection until it has finished: an error it meets is raised here,
    and stopping early waits for its current request.
    """
    slots: queue.Queue[tuple[int, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[int, Any]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put((0, item)):
                    return
            put((1, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((2, exc))

    worker = threading.Thread(target=run, name="imap-fetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == 0:
                yield value
            elif kind == 1:
                return
            else:
                raise value
    finally:
        stop.set()
        worker.join()


def _read_folder(
    session: _Session, folder: str, checkpoint: str | None, stats: MailStats
) -> Iterator[tuple[MailMessage, dict[str, str]]]:
    src, tuning, meter = session.src, session.tuning, session.meter
    key = folder_key(folder)
    validity, last = parse_checkpoint(checkpoint)
    failures = 0
    while True:
        try:
            client = session.client()
            info = client.select_folder(folder, readonly=True)  # EXAMINE: flags stay as they are
            meter.read_only[folder] = b"READ-ONLY" in info
            current = int(info.get(b"UIDVALIDITY", 0))
            if current != validity:
                validity, last = current, 0  # the folder was recreated: its UIDs mean new messages
            uidnext = info.get(b"UIDNEXT")
            if isinstance(uidnext, int) and uidnext <= last + 1:
                return  # nothing arrived since the last pass: not even a SEARCH
            uids = new_uids(client.search(["UID", f"{last + 1}:*"]), last)
            batches = (_download(client, b, tuning, meter) for b in _chunks(uids, tuning.batch))
            for batch in _ahead(batches):
                for fetched in batch:
                    last = fetched.uid
                    msg = _parse(fetched, src, folder, stats)
                    if msg is not None:
                        meter.messages += 1
                        meter.folders[folder] = meter.folders.get(folder, 0) + 1
                        yield msg, {key: f"{validity}:{fetched.uid}"}
                failures = 0
            return
        except (*_DROPPED, _Unreachable) as exc:
            # a reconnection that fails counts as an attempt: the server may be restarting
            session.drop()
            failures += 1
            if failures >= tuning.attempts:
                reason = exc.message if isinstance(exc, SourceError) else str(exc) or type(exc).__name__
                raise session._fail(
                    f"connection to {session.address} lost while reading {folder!r} "
                    f"({reason}); gave up after {failures} attempts"
                ) from None
            meter.reconnects += 1
            time.sleep(tuning.backoff * 2 ** (failures - 1))
        except IMAPClientError as exc:
            raise session._fail(f"cannot read folder {folder!r}: {_server_text(exc)}") from None


def _parse(fetched: _Fetched, src: ImapSource, folder: str, stats: MailStats) -> MailMessage | None:
    """One message from its fetched pieces; a failure is counted with its place, never raised."""
    location = _location(src, folder, fetched.uid)
    stats.messages += 1
    if fetched.problem is not None or fetched.tree is None:
        stats.problem(f"{location}: {fetched.problem}")
        return None
    try:
        tree = rebuild(fetched.header, fetched.tree, fetched.contents)
        return from_email(tree, source=src.name, location=location)
    except Exception as exc:  # one bad message is counted, never fatal to the folder
        stats.problem(f"{location}: {type(exc).__name__}: {exc}")
        return None


def read_imap(
    src: ImapSource,
    *,
    base: Path,
    previous: Mapping[str, str],
    stats: MailStats,
    tuning: Tuning = Tuning(),
    meter: Meter | None = None,
) -> Iterator[tuple[MailMessage, dict[str, str]]]:
    """New messages of the source's folders, each with the checkpoint updates it makes valid.

    `previous` holds this source's checkpoints (`folder:NAME` -> `UIDVALIDITY:LASTUID`). An update
    is valid once its message and every message before it have been committed. Raises SourceError
    (one line, naming the source, never the secret) when the server cannot be reached or refuses
    the login, or a folder cannot be read; the other folders are read first.
    """
    session = _Session(src, base, tuning, meter if meter is not None else Meter())
    problems: list[SourceError] = []
    try:
        session.client()
        for folder in src.folders:
            try:
                yield from _read_folder(session, folder, previous.get(folder_key(folder)), stats)
            except SourceError as exc:
                if "cannot read folder" not in exc.message:
                    raise
                problems.append(exc)
    finally:
        session.close()
    if problems:
        raise SourceError("; ".join(p.message for p in problems), where=src.name)


def probe_imap(src: ImapSource, base: Path, tuning: Tuning = Tuning()) -> None:
    """Log in and look at each folder (STATUS, which selects nothing): for `check`."""
    session = _Session(src, base, tuning, Meter())
    try:
        client = session.client()
        for folder in src.folders:
            try:
                client.folder_status(folder, [b"UIDVALIDITY", b"MESSAGES"])
            except _DROPPED as exc:
                raise session._fail(f"connection to {session.address} lost: {exc}") from None
            except IMAPClientError as exc:
                raise session._fail(f"cannot read folder {folder!r}: {_server_text(exc)}") from None
    finally:
        session.close()


class ImapMailbox:
    """An IMAP source as a `MailSource` (see `read_imap`; checkpoints `folder:NAME`)."""

    def __init__(
        self, src: ImapSource, base: Path, tuning: Tuning = Tuning(), meter: Meter | None = None
    ) -> None:
        self.src = src
        self.name = src.name
        self.base = base
        self.tuning = tuning
        self.meter = meter

    def read(
        self, previous: Mapping[str, str], stats: MailStats
    ) -> Iterator[tuple[MailMessage | None, dict[str, str]]]:
        return read_imap(
            self.src, base=self.base, previous=previous, stats=stats, tuning=self.tuning, meter=self.meter
        )

    def probe(self) -> None:
        probe_imap(self.src, self.base, self.tuning)

    def forwarding_rules(self, now: datetime) -> list[ForwardingRule]:
        return []  # IMAP does not expose a mailbox's rules (Sieve scripts live in ManageSieve)
