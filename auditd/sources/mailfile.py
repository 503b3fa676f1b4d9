"""Mail from files: a Maildir folder, an mbox file, or single .eml files.

Messages are parsed with the standard library, bodies are decoded into text in memory (capped),
and nothing is ever written back: a Maildir's files are opened read-only and never renamed.
"""

from __future__ import annotations

import email
import email.message
import email.utils
import html
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import decode_header, make_header
from pathlib import Path

from auditd.errors import InputError
from auditd.model import Address, MailMessage

TEXT_CAP = 256 * 1024  # characters of body text kept in memory per message
KEPT_HEADERS = frozenset(
    h.lower()
    for h in (
        "X-Forwarded-To",
        "X-Forwarded-For",
        "X-MS-Exchange-Inbox-Rules-Loop",
        "X-MS-Exchange-Generated-Message-Source",
        "Resent-From",
        "Resent-To",
        "Return-Path",
        "Auto-Submitted",
        "Precedence",
        "List-Id",
        "List-Unsubscribe",
        "X-Autoreply",
        "X-Auto-Response-Suppress",
        "In-Reply-To",
        "References",
    )
)


@dataclass
class MailStats:
    messages: int = 0
    unparseable: int = 0
    first_problem: str | None = None

    def problem(self, where: str) -> None:
        self.unparseable += 1
        if self.first_problem is None:
            self.first_problem = where


def decode_words(value: str | None) -> str:
    """Decode RFC 2047 encoded words; unknown charsets and broken words degrade, never raise."""
    if not value:
        return ""
    try:
        return str(make_header(decode_header(value)))
    except (LookupError, UnicodeError, ValueError, email.errors.HeaderParseError):
        return value


def _addresses(values: list[str]) -> tuple[Address, ...]:
    out: list[Address] = []
    for name, addr in email.utils.getaddresses(values):
        addr = addr.strip().strip("<>").lower()
        if "@" in addr:
            out.append(Address(addr, decode_words(name).strip()))
    return tuple(out)


def _header_strs(msg: email.message.Message, name: str) -> list[str]:
    return [decode_words(str(v)) for v in msg.get_all(name, [])]


def _payload_text(part: email.message.Message) -> str:
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        return ""
    charset = part.get_content_charset() or ""
    for cs in (charset, "utf-8", "windows-1252"):
        if not cs:
            continue
        try:
            return raw.decode(cs)
        except (LookupError, UnicodeDecodeError):
            continue
    return raw.decode("latin-1")


_TAGS = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]+>", re.S | re.I)
_BREAKS = re.compile(r"<\s*(br|/p|/div|/tr|/li|/h\d)\b[^>]*>", re.I)


def html_to_text(markup: str) -> str:
    """Enough of HTML-to-text for matching words: drop tags, keep line breaks, unescape."""
    return html.unescape(_TAGS.sub(" ", _BREAKS.sub("\n", markup)))


def body_text(msg: email.message.Message, cap: int = TEXT_CAP) -> str:
    """Plain text of a message: text/plain parts, else HTML converted; attachments are skipped.

    Nested message/rfc822 parts (a forwarded message) are walked too: what was forwarded matters.
    """
    plain: list[str] = []
    htmls: list[str] = []
    size = 0
    for part in msg.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        if part.get_content_disposition() == "attachment":
            continue
        text = _payload_text(part)
        (plain if part.get_content_subtype() == "plain" else htmls).append(text)
        size += len(text)
        if size > cap:
            break
    text = "\n".join(plain) if plain else "\n".join(html_to_text(h) for h in htmls)
    return text[:cap]


def _date(msg: email.message.Message) -> datetime | None:
    value = msg.get("Date")
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def parse_message(raw: bytes, *, source: str, location: str) -> MailMessage:
    """Parse one RFC 5322 message. Malformed MIME is parsed as far as it goes; defects are counted."""
    msg = email.message_from_bytes(raw)
    defects = len(msg.defects) + sum(len(p.defects) for p in msg.walk() if p is not msg)
    senders = _addresses(_header_strs(msg, "From"))
    message_id = str(msg.get("Message-ID", "")).strip() or None
    headers = tuple((k, decode_words(str(v))) for k, v in msg.items() if k.lower() in KEPT_HEADERS)
    return MailMessage(
        source=source,
        location=location,
        message_id=message_id,
        date=_date(msg),
        sender=senders[0] if senders else None,
        to=_addresses(_header_strs(msg, "To")),
        cc=_addresses(_header_strs(msg, "Cc")),
        reply_to=_addresses(_header_strs(msg, "Reply-To")),
        subject=decode_words(str(msg.get("Subject", ""))).strip(),
        text=body_text(msg),
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


def read_maildir(
    path: Path, *, source: str, since_mtime_ns: int = 0, stats: MailStats | None = None
) -> Iterator[tuple[MailMessage, int]]:
    """Messages in `new/` and `cur/` modified at or after `since_mtime_ns`, with their mtime.

    Maildir clients rename files to change flags, which keeps the mtime, so a message is not
    read again just because it was read or flagged.
    """
    stats = stats if stats is not None else MailStats()
    if not is_maildir(path):
        raise InputError("not a Maildir folder (no cur/ or new/)", where=str(path))
    entries: list[tuple[int, Path]] = []
    for sub in ("new", "cur"):
        folder = path / sub
        if not folder.is_dir():
            continue
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                mtime = entry.stat().st_mtime_ns
                if mtime >= since_mtime_ns:
                    entries.append((mtime, Path(entry.path)))
    for mtime, file in sorted(entries):
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            continue  # moved between new/ and cur/ while we looked; seen under its new name
        except OSError as exc:
            stats.problem(f"{file}: {exc.strerror}")
            continue
        msg = _parse_or_count(raw, source, str(file), stats)
        if msg is not None:
            yield msg, mtime


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
