"""Mail from files: a Maildir folder, an mbox file, or single .eml files.

Messages are parsed with the standard library, bodies are decoded into text in memory (capped),
and nothing is ever written back: a Maildir's files are opened read-only and never renamed.

Decoding never raises on what real mail contains: RFC 2047 words in any charset (and broken ones),
8-bit bytes in headers (UTF-8 first, else windows-1252), bodies whose declared charset is wrong,
missing or unknown, quoted-printable and base64 (broken padding included), HTML-only bodies,
nested message/rfc822 parts (a forwarded message: its text is what forwarding carried), broken
boundaries and huge headers. What cannot be read is left out; the message is still classified.
"""

from __future__ import annotations

import codecs
import email
import email.errors
import email.message
import email.utils
import glob
import html
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import decode_header
from pathlib import Path

from auditd.errors import InputError, SourceError
from auditd.model import Address, ForwardingRule, MailMessage

TEXT_CAP = 256 * 1024  # characters of body text kept in memory per message
HEADER_CAP = 16 * 1024  # characters of one header value looked at (a 1 MB To: is not read whole)
ADDRESS_CAP = 500  # addresses read from one header
DEPTH_CAP = 20  # MIME nesting followed (forwards of forwards); deeper parts are left out
KEPT_HEADERS = frozenset(
    h.lower()
    for h in (
        "X-Forwarded-To",
        "X-Forwarded-For",
        "X-MS-Exchange-Inbox-Rules-Loop",
        "X-MS-Exchange-Generated-Message-Source",
        "Resent-From",
        "Resent-Sender",
        "Resent-To",
        "Resent-Cc",
        "Return-Path",
        "Delivered-To",
        "X-Original-To",
        "Auto-Submitted",
        "Precedence",
        "List-Id",
        "List-Unsubscribe",
        "List-Post",
        "Feedback-ID",
        "X-Autoreply",
        "X-Autorespond",
        "X-Auto-Response-Suppress",
        "X-Campaign",
        "X-Mailer",
        "Content-Type",
        "In-Reply-To",
        "References",
    )
)
# Declared charsets that mail programs routinely mislabel: windows-1252 is a superset of Latin-1's
# printable range, and "us-ascii" mail with 8-bit bytes is nearly always UTF-8 or windows-1252.
_CHARSET_ALIASES = {
    "iso-8859-1": "windows-1252",
    "iso8859-1": "windows-1252",
    "latin-1": "windows-1252",
    "latin1": "windows-1252",
    "us-ascii": "utf-8",
    "ascii": "utf-8",
    "unknown-8bit": "utf-8",
    "x-unknown": "utf-8",
}


@dataclass
class MailStats:
    messages: int = 0
    unparseable: int = 0
    first_problem: str | None = None

    def problem(self, where: str) -> None:
        self.unparseable += 1
        if self.first_problem is None:
            self.first_problem = where


def decode_bytes(raw: bytes, charset: str | None = None) -> str:
    """Bytes to text: the declared charset, else UTF-8, else windows-1252, else Latin-1 (never fails)."""
    declared = (charset or "").strip().strip('"').lower()
    declared = _CHARSET_ALIASES.get(declared, declared)
    for cs in (declared, "utf-8", "windows-1252"):
        if not cs:
            continue
        try:
            codecs.lookup(cs)
            return raw.decode(cs)
        except (LookupError, UnicodeError, ValueError):
            continue
    return raw.decode("latin-1")


def _raw_header(value: str) -> str:
    """A header as the bytes parser left it (8-bit bytes as surrogates), decoded to text."""
    value = value[:HEADER_CAP]
    if value.isascii():  # nearly every header: nothing to decode
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeError:
        return value.encode("utf-8", "replace").decode("utf-8")
    return decode_bytes(raw)


def decode_words(value: str | None) -> str:
    """Decode RFC 2047 encoded words; unknown charsets and broken words degrade, never raise."""
    if not value:
        return ""
    value = value if isinstance(value, str) else str(value)
    surrogates = not value.isascii() and _SURROGATE.search(value) is not None
    value = _raw_header(value) if surrogates else value[:HEADER_CAP]
    if "=?" not in value:
        return _unfold(value)
    try:
        parts = decode_header(value)
    except (email.errors.HeaderParseError, ValueError, LookupError, UnicodeError, AssertionError):
        return _unfold(value)
    out: list[str] = []
    for chunk, charset in parts:
        out.append(decode_bytes(chunk, charset) if isinstance(chunk, bytes) else chunk)
    return _unfold("".join(out))


_SURROGATE = re.compile("[\udc80-\udcff]")  # an 8-bit byte the bytes parser could not decode
_FOLD = re.compile(r"\r?\n[ \t]*")


def _unfold(value: str) -> str:
    if "\n" not in value and "\x00" not in value:
        return value
    return _FOLD.sub(" ", value).replace("\x00", "")


# The forms nearly all mail uses, `Name <local@domain>` and `local@domain` (comma-separated), read
# without the email package's character-at-a-time parser; anything else (quotes, comments, groups,
# dots in a name, odd addresses) goes to `getaddresses`. Both give the same pairs for these forms.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
_ADDRESS = rf"{_DOT_ATOM}@{_DOT_ATOM}"
_SIMPLE_ADDRESS = re.compile(
    rf"[ \t\r\n]*(?:([^<>()\[\]\",;:\\@.]*?)[ \t\r\n]*<({_ADDRESS})>|({_ADDRESS}))[ \t\r\n]*"
)
_LWS = re.compile(r"[ \t\r\n]+")


def _simple_pairs(values: list[str]) -> list[tuple[str, str]] | None:
    """`getaddresses(values)` for the simple forms, else None."""
    pairs: list[tuple[str, str]] = []
    for value in values:
        for piece in value.split(","):
            m = _SIMPLE_ADDRESS.fullmatch(piece)
            if m is None:
                return None
            name, routed, bare = m.groups()
            if bare is not None:
                pairs.append(("", bare))
            else:
                pairs.append((_LWS.sub(" ", name) if name else "", routed))
    return pairs


def _addresses(values: list[str]) -> tuple[Address, ...]:
    out: list[Address] = []
    pairs = _simple_pairs(values)
    if pairs is None:
        try:
            pairs = email.utils.getaddresses(values)
        except (ValueError, TypeError, IndexError):
            pairs = []
    for name, addr in pairs[:ADDRESS_CAP]:
        addr = addr.strip().strip("<>").lower()
        if "@" in addr and " " not in addr:
            out.append(Address(addr, decode_words(name).strip().strip("'\"").strip()))
    return tuple(out)


def _header_strs(msg: email.message.Message, name: str) -> list[str]:
    """Every value of one header, raw bytes decoded; encoded words are left for the caller."""
    return [_raw_header(v) for k, v in msg.raw_items() if k.lower() == name.lower()]


def _payload_text(part: email.message.Message, cap: int) -> str:
    try:
        raw = part.get_payload(decode=True)
    except (ValueError, TypeError, LookupError, AssertionError):
        return ""
    if not isinstance(raw, bytes):
        return ""
    try:
        charset = part.get_content_charset() or ""
    except (ValueError, LookupError, UnicodeError):
        charset = ""
    return decode_bytes(raw[: cap * 4], charset)


_DROP = re.compile(r"<!--.*?(?:-->|\Z)|<(script|style|head|title)\b.*?(?:</\1\s*>|\Z)", re.S | re.I)
_BREAKS = re.compile(r"<\s*(br|p|/p|div|/div|tr|/tr|li|/li|h\d|/h\d|blockquote|/blockquote|hr)\b[^>]*>", re.I)
_TAG = re.compile(r"<[^>]*>|<[a-zA-Z/!][^>]*\Z")


def html_to_text(markup: str) -> str:
    """Enough of HTML-to-text for matching words: drop scripts, styles and tags; keep line breaks."""
    text = _TAG.sub(" ", _BREAKS.sub("\n", _DROP.sub(" ", markup)))
    text = html.unescape(text).replace("\xa0", " ")
    return "\n".join(" ".join(line.split()) for line in text.splitlines())


def body_text(msg: email.message.Message, cap: int = TEXT_CAP) -> str:
    """Plain text of a message: of each alternative the plain part (else HTML as text); attachments skipped.

    Nested message/rfc822 parts (a forwarded message) are included, with their From and Subject:
    what was forwarded matters.
    """
    out: list[str] = []
    size = 0

    def add(text: str) -> None:
        nonlocal size
        if size < cap and text:
            out.append(text)
            size += len(text)

    def walk(part: email.message.Message, depth: int) -> None:
        if depth > DEPTH_CAP or size >= cap:
            return
        ctype = part.get_content_type()
        if part.is_multipart():
            children = [p for p in (part.get_payload() or []) if isinstance(p, email.message.Message)]
            if ctype == "message/rfc822":
                for inner in children:
                    for name in ("From", "Subject"):
                        for value in _header_strs(inner, name)[:1]:
                            add(f"{name}: {decode_words(value)}\n")
                    walk(inner, depth + 1)
                return
            if ctype == "multipart/alternative" and children:
                plain = [p for p in children if p.get_content_type() == "text/plain"]
                walk(plain[-1] if plain else children[-1], depth + 1)
                return
            for child in children:
                walk(child, depth + 1)
            return
        if ctype not in ("text/plain", "text/html"):
            return
        if depth > 0 and part.get_content_disposition() == "attachment":
            return
        text = _payload_text(part, cap)
        add(html_to_text(text) if ctype == "text/html" else text)

    walk(msg, 0)
    return "\n".join(out)[:cap]


def _date(values: list[str]) -> datetime | None:
    if not values:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(decode_words(values[0]).strip())
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


_READ_HEADERS = frozenset(("from", "message-id", "to", "cc", "reply-to", "subject", "date"))


def parse_message(raw: bytes, *, source: str, location: str) -> MailMessage:
    """Parse one RFC 5322 message. Malformed MIME is parsed as far as it goes; defects are counted."""
    return from_email(email.message_from_bytes(raw), source=source, location=location)


def from_email(msg: email.message.Message, *, source: str, location: str) -> MailMessage:
    """A MailMessage from a parsed message (compat32), as `parse_message` makes and IMAP builds."""
    defects = len(msg.defects) + sum(len(p.defects) for p in msg.walk() if p is not msg)
    # one pass over the header block; each value decoded once, and only the ones used
    found: dict[str, list[str]] = {}
    kept: list[tuple[str, str]] = []
    for k, v in msg.raw_items():
        name = k.lower()
        if name in _READ_HEADERS:
            found.setdefault(name, []).append(_raw_header(v))
        if name in KEPT_HEADERS:
            kept.append((k, decode_words(_raw_header(v))))
    senders = _addresses([decode_words(v) for v in found.get("from", ())])
    ids = found.get("message-id")
    message_id = " ".join(ids[0].split())[:998] if ids and ids[0].strip() else None
    headers = tuple(kept)

    def addrs(name: str) -> tuple[Address, ...]:
        return _addresses(found.get(name, []))

    subjects = found.get("subject")
    try:
        text = body_text(msg)
    except Exception:  # the headers still classify a message whose body cannot be read
        text = ""
        defects += 1
    return MailMessage(
        source=source,
        location=location,
        message_id=message_id,
        date=_date(found.get("date", [])),
        sender=senders[0] if senders else None,
        to=addrs("to"),
        cc=addrs("cc"),
        reply_to=addrs("reply-to"),
        subject=decode_words(subjects[0]).strip() if subjects else "",
        text=text,
        headers=headers,
        defects=defects,
    )


def _parse_or_count(raw: bytes, source: str, location: str, stats: MailStats) -> MailMessage | None:
    stats.messages += 1
    try:
        return parse_message(raw, source=source, location=location)
    except Exception as exc:
        stats.problem(f"{location}: {type(exc).__name__}: {exc}")
        return None


def is_maildir(path: Path) -> bool:
    return path.is_dir() and ((path / "cur").is_dir() or (path / "new").is_dir())


def maildir_key(name: str) -> str:
    """A Maildir file's unique part: what stays when a client renames it to change flags."""
    return name.partition(":")[0].partition("!2,")[0]


def read_maildir(
    path: Path,
    *,
    source: str,
    since_mtime_ns: int = 0,
    seen: frozenset[str] = frozenset(),
    stats: MailStats | None = None,
) -> Iterator[tuple[MailMessage, tuple[int, str]]]:
    """Messages in `new/` and `cur/` modified at or after `since_mtime_ns`, with (mtime, key).

    Maildir clients rename files to change flags, which keeps the mtime, so a message is not
    read again just because it was read or flagged. Several files can share one mtime (a
    copy, a checkout, a coarse clock): `seen` names the keys already read at `since_mtime_ns`.
    """
    stats = stats if stats is not None else MailStats()
    if not is_maildir(path):
        raise InputError("not a Maildir folder (no cur/ or new/)", where=str(path))
    entries: list[tuple[int, str, Path]] = []
    for sub in ("new", "cur"):
        folder = path / sub
        if not folder.is_dir():
            continue
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                mtime = entry.stat().st_mtime_ns
                key = maildir_key(entry.name)
                if mtime > since_mtime_ns or (mtime == since_mtime_ns and key not in seen):
                    entries.append((mtime, key, Path(entry.path)))
    for mtime, key, file in sorted(entries):
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            continue  # moved between new/ and cur/ while we looked; seen under its new name
        except OSError as exc:
            stats.problem(f"{file}: {exc.strerror}")
            continue
        msg = _parse_or_count(raw, source, str(file), stats)
        if msg is not None:
            yield msg, (mtime, key)


_MBOX_FROM = re.compile(rb"^From \S+")


def is_mbox(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return bool(_MBOX_FROM.match(fh.read(256)))
    except OSError:
        return False


def read_mbox(
    path: Path, *, source: str, offset: int = 0, stats: MailStats | None = None
) -> Iterator[tuple[MailMessage, int]]:
    """Messages of an mbox from byte `offset`, each with the offset just past it.

    Read as a stream of lines, so a large mbox is never held in memory whole.
    """
    stats = stats if stats is not None else MailStats()
    if not is_mbox(path):
        raise InputError("not an mbox file (does not start with a 'From ' line)", where=str(path))
    with path.open("rb") as fh:
        fh.seek(offset)
        if offset:
            line = fh.readline()  # re-synchronise on a "From " separator
            while line and not _MBOX_FROM.match(line):
                line = fh.readline()
            if not line:
                return
        else:
            line = fh.readline()
        start = fh.tell() - len(line)
        buf: list[bytes] = []
        position = fh.tell()
        while True:
            line = fh.readline()
            if not line or _MBOX_FROM.match(line):
                # mboxrd: un-escape ">From " lines
                raw = b"".join(b[1:] if b.startswith(b">From ") else b for b in buf)
                msg = _parse_or_count(raw, source, f"{path}@{start}", stats)
                if msg is not None:
                    yield msg, position
                if not line:
                    return
                start = position
                buf = []
            else:
                buf.append(line)
            position = fh.tell()


def read_eml(path: Path, *, source: str, stats: MailStats | None = None) -> MailMessage | None:
    stats = stats if stats is not None else MailStats()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", where=str(path)) from None
    return _parse_or_count(raw, source, str(path), stats)


# ---- the file backends (see auditd.sources.base.MailSource) ---------------------------------------

POSITION = "position"  # the one checkpoint key of a file source


def _missing(name: str, path: Path, what: str) -> SourceError:
    return SourceError(f"{path}: {what}", where=name)


class MaildirFolder:
    """A Maildir folder. Checkpoint: `MTIME name/name…`, the newest mtime read (ns) and the keys
    (`maildir_key`) of the files read at that mtime."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path

    def read(
        self, previous: Mapping[str, str], stats: MailStats
    ) -> Iterator[tuple[MailMessage | None, dict[str, str]]]:
        since, seen = 0, frozenset[str]()
        stamp, _, names = (previous.get(POSITION) or "").partition(" ")
        if stamp.isdigit():
            since, seen = int(stamp), frozenset(n for n in names.split("/") if n)
        for msg, (mtime, key) in read_maildir(
            self.path, source=self.name, since_mtime_ns=since, seen=seen, stats=stats
        ):
            if mtime != since:
                since, seen = mtime, frozenset()
            seen = seen | {key}
            yield msg, {POSITION: f"{since} {'/'.join(sorted(seen))}"}

    def probe(self) -> None:
        if not self.path.exists():
            raise _missing(self.name, self.path, "not found")
        if not is_maildir(self.path):
            raise _missing(self.name, self.path, "not a Maildir folder (no cur/ or new/)")

    def forwarding_rules(self, now: datetime) -> list[ForwardingRule]:
        return []  # files hold messages, not a mailbox's rules


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}-{st.st_ino}"


class MboxFile:
    """An mbox file. Checkpoint: `DEV-INO:OFFSET`, the file's identity and the offset after the last
    message read; a replaced or truncated file is read again from the start."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path

    def _offset(self, identity: str, checkpoint: str | None) -> int:
        if not checkpoint or ":" not in checkpoint:
            return 0
        was, _, offset = checkpoint.rpartition(":")
        if was != identity or not offset.isdigit() or int(offset) > self.path.stat().st_size:
            return 0
        return int(offset)

    def read(
        self, previous: Mapping[str, str], stats: MailStats
    ) -> Iterator[tuple[MailMessage | None, dict[str, str]]]:
        try:
            identity = _file_identity(self.path)
            if self.path.stat().st_size == 0:
                return  # a new, empty mbox: nothing yet, not a broken file
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror}", where=str(self.path)) from None
        offset = self._offset(identity, previous.get(POSITION))
        for msg, end in read_mbox(self.path, source=self.name, offset=offset, stats=stats):
            yield msg, {POSITION: f"{identity}:{end}"}

    def probe(self) -> None:
        if not self.path.exists():
            raise _missing(self.name, self.path, "not found")
        if not self.path.is_file():
            raise _missing(self.name, self.path, "not a file")
        if self.path.stat().st_size and not is_mbox(self.path):
            raise _missing(self.name, self.path, "not an mbox file (does not start with a 'From ' line)")

    def forwarding_rules(self, now: datetime) -> list[ForwardingRule]:
        return []  # files hold messages, not a mailbox's rules


class EmlFiles:
    """Single-message files: a folder's `*.eml`, a glob, or one file. Checkpoint: JSON
    `[CTIME, [path, ...]]`, the newest inode change time read (ns) and the files read at it.

    The change time, not the modification time: a file copied in with its old mtime kept
    (`cp -p`, rsync) still has a new ctime, so it is not taken for one read before.
    """

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path

    def _files(self) -> list[Path]:
        if self.path.is_dir():
            return sorted(self.path.glob("*.eml"))
        if self.path.is_file():
            return [self.path]
        return [Path(p) for p in sorted(glob.glob(str(self.path)))]

    def read(
        self, previous: Mapping[str, str], stats: MailStats
    ) -> Iterator[tuple[MailMessage | None, dict[str, str]]]:
        since, seen = _eml_checkpoint(previous.get(POSITION))
        entries: list[tuple[int, str, Path]] = []
        for f in self._files():
            try:
                changed = f.stat().st_ctime_ns
            except FileNotFoundError:
                continue  # removed since the listing
            if changed > since or (changed == since and str(f) not in seen):
                entries.append((changed, str(f), f))
        for changed, key, f in sorted(entries):
            if changed != since:
                since, seen = changed, frozenset()
            seen = seen | {key}
            update = {POSITION: json.dumps([since, sorted(seen)], ensure_ascii=False)}
            yield read_eml(f, source=self.name, stats=stats), update

    def probe(self) -> None:
        if not self.path.is_dir() and not self._files():
            raise _missing(self.name, self.path, "not found (no such folder, file or matching files)")

    def forwarding_rules(self, now: datetime) -> list[ForwardingRule]:
        return []  # files hold messages, not a mailbox's rules


def _eml_checkpoint(value: str | None) -> tuple[int, frozenset[str]]:
    """An EmlFiles checkpoint; anything unreadable means from the start (messages are de-duplicated)."""
    try:
        stamp, names = json.loads(value) if value else (0, [])
        if isinstance(stamp, int) and isinstance(names, list):
            return stamp, frozenset(str(n) for n in names)
    except (ValueError, TypeError):
        pass
    return 0, frozenset()
