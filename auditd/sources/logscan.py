"""Block scanners for the hot paths of the Zeek TSV and Squid native readers.

A big log repeats a few thousand names over millions of lines, and most are not wanted
(`--only-matches`). The readers (`auditd.sources.zeek`, `auditd.sources.squid`) remember per name
field what it names (None: not wanted). A scanner takes a block of whole lines and returns only
the lines that need more: `(start, end, line index in the block, what)`, where `what` is the
line's record (a name remembered as wanted), the reason it is bad (a str), or None (a name not
seen when the block was scanned: the reader reads that line carefully, which fills the memo).

This module is compiled by mypyc (`make speedups`, see `_COMPILED`) and still runs as plain Python,
and both give the same answers. Compiled, a block is walked byte by byte (`block[i]` on bytes with a
native int index makes no object): a line whose name is remembered as unwanted costs one slice
and one dict lookup, and a wanted line's fields are sliced out of the block without splitting it.
Interpreted, a line is split only as far as its name field (C code), which beats any Python loop
over its bytes. The name field is what `raw.split(sep, i_name + 1)[i_name]` (Zeek TSV) or the
CONNECT target or URL prefix of `raw.split(None, 7)` (Squid native) gives, newline included when
it ends the line, so both ways key the memo alike.

`log_jsonl` and `iso_json` are here too, for the same reason: the JSON `inspect` writes for each
matching line cost more than finding the line, until compiled.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from json.encoder import encode_basestring as quote  # what json.dumps(ensure_ascii=False) uses
from types import FunctionType
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from mypy_extensions import i64  # a native 64-bit int when compiled; only an annotation otherwise

    from auditd.classifier import Classification

# A Zeek record: (log, ts, uid, orig, resp, name, duration, bytes), see `auditd.sources.zeek`.
Record = tuple[str, float | str, str, str, str, str, float, int | None]
# A Squid line: (time, first seen, client, server, host, bytes), see `auditd.sources.squid`.
Parsed = tuple[datetime, datetime, str, str, str, int | None]

NL: Final[i64] = 10  # "\n"
CR: Final[i64] = 13  # "\r"
SLASH: Final[i64] = 47  # "/"
COLON: Final[i64] = 58  # ":"


def _is_space(c: i64) -> bool:
    """What `bytes.split()` splits on: ASCII space, \\t, \\n, \\v, \\f and \\r (the Squid walkers
    test this inline, a call per byte costs too much; the function is the probe for `_COMPILED`)."""
    return c == 32 or 9 <= c <= 13


# Compiled functions are not Python function objects: blocks are walked byte by byte only then.
_COMPILED: Final = not isinstance(_is_space, FunctionType)

UNSEEN: Final = "\0unseen"  # a memo miss (compared by identity: no decoded name is this object)


# ---- Zeek TSV ---------------------------------------------------------------------------------


class TsvLayout:
    """What the scanner needs of a TSV log's header: its separator, unset mark and field positions
    (-1: no such field; `i_ts` and `i_name` are always there)."""

    def __init__(
        self,
        sep: bytes,
        unset: bytes,
        log: str,
        nfields: int,
        i_ts: int,
        i_uid: int,
        i_orig: int,
        i_resp: int,
        i_name: int,
    ) -> None:
        self.sep = sep
        self.unset = unset
        self.log = log
        self.nfields = nfields
        self.i_ts = i_ts
        self.i_uid = i_uid
        self.i_orig = i_orig
        self.i_resp = i_resp
        self.i_name = i_name


TsvFound = tuple[int, int, int, Record | str | None]


def tsv_lines(block: bytes, t: TsvLayout, memo: dict[bytes, str | None]) -> tuple[int, list[TsvFound]]:
    """(lines in `block`, its lines whose name field is not remembered as unwanted): see the module doc.

    `block` is whole lines, each ending in a newline, with no header line.
    """
    if _COMPILED and block.endswith(b"\n") and len(t.sep) == 1 and t.sep not in b"\r\n":
        return _tsv_walk(block, t, memo)
    out: list[TsvFound] = []
    lines_in = io.BytesIO(block)  # shares the block: iterating it is cheaper than a split
    sep, i_name, k = t.sep, t.i_name, t.i_name + 1
    j = -1
    for j, raw in enumerate(lines_in):
        try:
            got = memo[raw.split(sep, k)[i_name]]
        except (KeyError, IndexError):
            got = UNSEEN
        if got is None:
            continue
        end = lines_in.tell()
        rec = None if got is UNSEEN else tsv_record(raw.rstrip(b"\r\n").split(sep), t, got)
        out.append((end - len(raw), end, j, rec))
    return j + 1, out


def tsv_record(parts: list[bytes], t: TsvLayout, name: str) -> Record | str:
    """The record of a line split into `parts` (without its line end), naming `name`."""
    if len(parts) != t.nfields:
        return f"expected {t.nfields} fields, got {len(parts)}"
    ts = parts[t.i_ts]
    if ts == t.unset:
        return "missing field ts"
    try:
        when = float(ts)
    except ValueError:
        return f"bad ts {ts[:40].decode('latin-1')!r}"
    orig = parts[t.i_orig] if t.i_orig >= 0 else t.unset
    if orig == t.unset:
        return "missing field id.orig_h"
    uid = parts[t.i_uid] if t.i_uid >= 0 else t.unset
    resp = parts[t.i_resp] if t.i_resp >= 0 else t.unset
    return (
        t.log,
        when,
        "" if uid == t.unset else uid.decode("latin-1"),
        orig.decode("latin-1"),
        "" if resp == t.unset else resp.decode("latin-1"),
        name,
        0.0,
        None,
    )


def _tsv_walk(block: bytes, t: TsvLayout, memo: dict[bytes, str | None]) -> tuple[int, list[TsvFound]]:
    """`tsv_lines`, walking the bytes: each loop stops at a newline, so the block must end in one."""
    out: list[TsvFound] = []
    sep: i64 = t.sep[0]
    i_name: i64 = t.i_name
    n: i64 = len(block)
    i: i64 = 0
    j: i64 = 0
    while i < n:
        start = i
        c: i64 = block[i]
        f: i64 = 0
        while f < i_name:  # to the start of the name field
            while c != sep and c != NL:
                i += 1
                c = block[i]
            if c == NL:
                break
            i += 1
            c = block[i]
            f += 1
        if f < i_name:  # too few fields: `split` would raise IndexError
            out.append((start, i + 1, j, None))
        else:
            a = i
            while c != sep and c != NL:
                i += 1
                c = block[i]
            got = memo.get(block[a : i + 1 if c == NL else i], UNSEEN)  # a last field keeps its newline
            while c != NL:  # to the end of the line
                i += 1
                c = block[i]
            if got is not None:
                rec = None if got is UNSEEN else _tsv_record_at(block, start, i + 1, t, got)
                out.append((start, i + 1, j, rec))
        i += 1
        j += 1
    return j, out


def _tsv_record_at(block: bytes, start: i64, end: i64, t: TsvLayout, name: str) -> Record | str:
    """`tsv_record(block[start:end].rstrip(b"\\r\\n").split(t.sep), t, name)` without the split."""
    sep: i64 = t.sep[0]
    i_ts: i64 = t.i_ts
    i_uid: i64 = t.i_uid
    i_orig: i64 = t.i_orig
    i_resp: i64 = t.i_resp
    e = end
    while e > start and block[e - 1] in (NL, CR):
        e -= 1
    # Field k spans [a, b); found by one walk, the four wanted kept (-1: the field is not there).
    a_ts: i64 = -1
    b_ts: i64 = -1
    a_uid: i64 = -1
    b_uid: i64 = -1
    a_orig: i64 = -1
    b_orig: i64 = -1
    a_resp: i64 = -1
    b_resp: i64 = -1
    f: i64 = 0
    a = start
    i = start
    while True:
        if i == e or block[i] == sep:
            if f == i_ts:
                a_ts, b_ts = a, i
            if f == i_uid:
                a_uid, b_uid = a, i
            if f == i_orig:
                a_orig, b_orig = a, i
            if f == i_resp:
                a_resp, b_resp = a, i
            f += 1
            a = i + 1
            if i == e:
                break
        i += 1
    if f != t.nfields:
        return f"expected {t.nfields} fields, got {f}"
    ts = block[a_ts:b_ts]
    unset = t.unset
    if ts == unset:
        return "missing field ts"
    try:
        when = float(ts)
    except ValueError:
        return f"bad ts {ts[:40].decode('latin-1')!r}"
    orig = block[a_orig:b_orig] if a_orig >= 0 else unset
    if orig == unset:
        return "missing field id.orig_h"
    uid = block[a_uid:b_uid] if a_uid >= 0 else unset
    resp = block[a_resp:b_resp] if a_resp >= 0 else unset
    return (
        t.log,
        when,
        "" if uid == unset else uid.decode("latin-1"),
        orig.decode("latin-1"),
        "" if resp == unset else resp.decode("latin-1"),
        name,
        0.0,
        None,
    )


# ---- Squid native ---------------------------------------------------------------------------

SquidFound = tuple[int, int, int, Parsed | str | None]


def squid_lines(
    block: bytes, connect: dict[bytes, str | None], other: dict[bytes, str | None]
) -> tuple[int, list[SquidFound]]:
    """(lines in `block`, its lines that are not native Squid lines or whose CONNECT target (in
    `connect`) or URL up to the end of its authority (in `other`, see `url_key`) is not remembered
    as unwanted): see the module doc. `block` is whole lines with no `#` and no `[`."""
    if _COMPILED and block.endswith(b"\n"):
        return _squid_walk(block, connect, other)
    out: list[SquidFound] = []
    lines_in = io.BytesIO(block)
    j = -1
    for j, raw in enumerate(lines_in):
        try:
            _, _, _, action, _, method, url, _ = raw.split(None, 7)
            if action.find(b"/") <= 0:  # not native (no `[` here, so no common-format line)
                raise ValueError
            host = connect[url] if method == b"CONNECT" else other[url_key(url)]
        except (KeyError, ValueError):
            host = UNSEEN
        if host is None:
            continue
        end = lines_in.tell()
        out.append((end - len(raw), end, j, None if host is UNSEEN else squid_native(raw.split(), host)))
    return j + 1, out


def squid_host(raw: bytes, connect: dict[bytes, str | None], other: dict[bytes, str | None]) -> str | None:
    """What the memos say now of one line's host: the host, None (not wanted) or `UNSEEN`."""
    try:
        _, _, _, action, _, method, url, _ = raw.split(None, 7)
        if action.find(b"/") <= 0:
            return UNSEEN
        return connect[url] if method == b"CONNECT" else other[url_key(url)]
    except (KeyError, ValueError):
        return UNSEEN


def squid_native(p: list[bytes], host: str) -> Parsed | str:
    """A native line split on whitespace into `p`, naming `host`."""
    if len(p) < 9:
        return f"expected at least 9 fields, got {len(p)}"
    return _squid_parsed(p[0], p[1], p[2], p[4], p[8], host)


def _squid_parsed(
    t: bytes, elapsed: bytes, client: bytes, size: bytes, hier: bytes, host: str
) -> Parsed | str:
    try:
        ts = datetime.fromtimestamp(float(t), UTC)
    except (ValueError, OverflowError, OSError):
        return f"bad time {t[:40].decode('latin-1')!r}"
    try:
        spent = timedelta(0, 0, int(elapsed) * 1000)  # `milliseconds=` is slower, and the same for ints
        got = int(size)
    except ValueError:
        return "elapsed or bytes is not a number"
    except OverflowError:
        return "elapsed out of range"
    try:
        first = ts - spent
    except OverflowError:
        return "elapsed out of range"
    peer = hier.partition(b"/")[2]
    server = "" if peer in (b"", b"-") else peer.decode("utf-8", "replace")
    return ts, first, client.decode("latin-1"), server, host, got


def url_key(url: bytes) -> bytes:
    """What the host of a non-CONNECT URL depends on: up to the end of its authority (b"": none)."""
    i = url.find(b"://")
    if i < 0:
        return b""
    j = url.find(b"/", i + 3)
    return url if j < 0 else url[:j]


def _squid_walk(
    block: bytes, connect: dict[bytes, str | None], other: dict[bytes, str | None]
) -> tuple[int, list[SquidFound]]:
    """`squid_lines`, walking the bytes: each loop stops at a newline, so the block must end in one."""
    out: list[SquidFound] = []
    n: i64 = len(block)
    i: i64 = 0
    j: i64 = 0
    while i < n:
        start = i
        c: i64 = block[i]
        native = True
        a3: i64 = 0
        b3: i64 = 0
        a5: i64 = 0
        b5: i64 = 0
        a6: i64 = 0
        b6: i64 = 0
        f: i64 = 0
        while True:  # fields 0-6 and the start of an eighth, as `split(None, 7)` finds them
            while c != NL and (c == 32 or 9 <= c <= 13):  # white space, as `bytes.split()` sees it
                i += 1
                c = block[i]
            if c == NL:
                native = False  # fewer than 8 fields
                break
            if f == 7:
                break
            a = i
            while c > 32 or not (c == 32 or 9 <= c <= 13):  # (most bytes are > 32) stops at the newline
                i += 1
                c = block[i]
            if f == 3:
                a3, b3 = a, i
            elif f == 5:
                a5, b5 = a, i
            elif f == 6:
                a6, b6 = a, i
            f += 1
        if native:
            native = block[a3] != SLASH and _find(block, SLASH, a3, b3) >= 0
        got: str | None = UNSEEN
        if native:
            if b5 - a5 == 7 and _is_connect(block, a5):
                got = connect.get(block[a6:b6], UNSEEN)
            else:
                got = other.get(_url_key_at(block, a6, b6), UNSEEN)
        while c != NL:  # to the end of the line
            i += 1
            c = block[i]
        i += 1
        if got is not None:
            out.append((start, i, j, None if got is UNSEEN else _squid_native_at(block, start, i, got)))
        j += 1
    return j, out


def _squid_native_at(block: bytes, start: i64, end: i64, host: str) -> Parsed | str:
    """`squid_native(block[start:end].split(), host)` without the split (the line ends in a newline)."""
    a0: i64 = 0
    b0: i64 = 0
    a1: i64 = 0
    b1: i64 = 0
    a2: i64 = 0
    b2: i64 = 0
    a4: i64 = 0
    b4: i64 = 0
    a8: i64 = 0
    b8: i64 = 0
    f: i64 = 0
    i = start
    c: i64 = block[i]
    while f < 9:
        while c != NL and (c == 32 or 9 <= c <= 13):
            i += 1
            c = block[i]
        if c == NL:
            break
        a = i
        while not (c == 32 or 9 <= c <= 13):  # stops at the newline too
            i += 1
            c = block[i]
        if f == 0:
            a0, b0 = a, i
        elif f == 1:
            a1, b1 = a, i
        elif f == 2:
            a2, b2 = a, i
        elif f == 4:
            a4, b4 = a, i
        elif f == 8:
            a8, b8 = a, i
        f += 1
    if f < 9:
        return f"expected at least 9 fields, got {f}"
    return _squid_parsed(block[a0:b0], block[a1:b1], block[a2:b2], block[a4:b4], block[a8:b8], host)


def _is_connect(block: bytes, a: i64) -> bool:
    """`block[a : a + 7] == b"CONNECT"`, without the slice."""
    return (
        block[a] == 67
        and block[a + 1] == 79
        and block[a + 2] == 78
        and block[a + 3] == 78
        and block[a + 4] == 69
        and block[a + 5] == 67
        and block[a + 6] == 84
    )


def _find(block: bytes, c: i64, a: i64, b: i64) -> i64:
    """`block.find(c, a, b)` for one byte, without a method call."""
    while a < b:
        if block[a] == c:
            return a
        a += 1
    return -1


def _url_key_at(block: bytes, a: i64, b: i64) -> bytes:
    """`url_key(block[a:b])` without slicing the URL first."""
    i = a
    while i + 2 < b and not (block[i] == COLON and block[i + 1] == SLASH and block[i + 2] == SLASH):
        i += 1
    if i + 2 >= b:
        return b""
    k = _find(block, SLASH, i + 3, b)
    return block[a : b if k < 0 else k]


# ---- output -----------------------------------------------------------------------------------

_TWO: Final = [f"{k:02d}" for k in range(100)]


def iso_json(dt: datetime) -> str:
    """`json.dumps(dt.isoformat())`: the JSON string of a time as `inspect` writes it.

    Compiled, a UTC time (what the log readers make) is formatted from its fields, at a third of
    the cost of `isoformat`, which then dominated a matching line's cost; any other time, and any
    time interpreted, goes through `isoformat` (its text never needs escaping in JSON).
    """
    if not _COMPILED or dt.tzinfo is not UTC:
        return '"' + dt.isoformat() + '"'
    year = dt.year
    us = dt.microsecond
    two = _TWO
    return (
        f'"{year if year >= 1000 else f"{year:04d}"}-{two[dt.month]}-{two[dt.day]}T{two[dt.hour]}'
        f':{two[dt.minute]}:{two[dt.second]}{"" if us == 0 else "." + str(1_000_000 + us)[1:]}+00:00"'
    )


def log_jsonl(
    records: Iterable[tuple[datetime, str, str, str, int | None]],
    classify: Callable[[str], Classification | None],
    only_matches: bool,
    write: Callable[[str], object],
) -> None:
    """`inspect`'s JSON lines for a log's records, each (time, client, server, host, bytes) of an
    observation a log reader makes (`via` "log", no service of its own: CONTRACT.md): the text
    `json.dumps(net_json(o), ensure_ascii=False)` gives once the classifier has filled it in
    (tests/test_inspect_json.py), from pieces cached per name and address. Here, compiled, because
    with `--only-matches` on a big log this loop is the cost of every matching line."""
    tails: dict[str, str] = {}  # host -> the JSON from "host" to "bytes"; "" when not written
    quoted: dict[str, str] = {}  # client or server -> its JSON string
    out: list[str] = []
    for ts, client, server, host, size in records:
        tail = tails.get(host)
        if tail is None:
            if len(tails) >= 1 << 16:  # bounded: a log of ever-new names must not grow these
                tails.clear()
            hit = classify(host)
            if hit is not None and hit.service is not None:
                svc, cat = quote(hit.service), "null" if hit.category is None else quote(hit.category)
                tail = f'"host": {quote(host)}, "via": "log", "service": {svc}, "category": {cat}, '
            elif only_matches:
                tail = ""
            else:
                tail = f'"host": {quote(host)}, "via": "log", "service": null, "category": null, '
            tails[host] = tail
        if not tail:
            continue
        c = quoted.get(client)
        if c is None:
            if len(quoted) >= 1 << 16:
                quoted.clear()
            c = quoted[client] = quote(client)
        s = quoted.get(server)
        if s is None:
            if len(quoted) >= 1 << 16:
                quoted.clear()
            s = quoted[server] = quote(server)
        out.append(
            f'{{"kind": "net", "ts": {iso_json(ts)}, "client": {c}, "server": {s}, {tail}"bytes": '
            f"{'null' if size is None else str(size)}}}\n"
        )
        if len(out) >= 4096:
            write("".join(out))
            out.clear()
    if out:
        write("".join(out))
