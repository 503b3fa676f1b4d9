"""Squid `access.log`: the native format and the common/combined log format.

Native (`logformat squid`, the default in Squid 2-6):
`time elapsed client action/code bytes method URL ident hierarchy/peer type`, for example
`1795512303.550 1200000 10.20.12.34 TCP_TUNNEL/200 187310000 CONNECT www.netflix.com:443 -
HIER_DIRECT/203.0.113.7 -` (one line).
`time` is when the request ended (epoch seconds with milliseconds) and `elapsed` its duration in ms,
so the flow spans `time - elapsed` to `time`; `bytes` is what Squid sent the client. The name is the
CONNECT target (`host:443`, how HTTPS goes through a proxy) or the URL's host; the server is the
peer address after `HIER_DIRECT/` (empty when the hierarchy names no address).

Common/combined (`logformat common` / `combined`):
`client ident user [24/Nov/2026:09:05:01 +0000] "CONNECT www.netflix.com:443 HTTP/1.1" 200 18234511 ...`
has no duration and no server: first and last seen are the one time-stamp.

Each line is its own flow (`flow` is `squid:<file>:<offset>`, the same when a line is read again).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from auditd.model import NetObservation
from auditd.sources.logio import Keep, LogStats, blocks, kept, open_log, start_of, strip_port, where
from auditd.sources.logscan import UNSEEN, Parsed, squid_host, squid_lines, squid_native, url_key

_COMMON = re.compile(
    rb'^(?P<client>\S+) \S+ \S+ \[(?P<ts>[^\]]+)\] "(?P<method>[A-Z]+) (?P<url>\S+)(?: [^"]*)?" '
    rb"(?P<status>\d{3}|-) (?P<bytes>\d+|-)"
)


def url_host(method: str, url: str) -> str:
    """The host a request went to: the CONNECT target, or the host part of an absolute URL."""
    if method == "CONNECT":
        return strip_port(url).lower()
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.isalpha():
        return ""
    authority = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    return strip_port(authority).lower()


def read_squid(
    path: Path,
    *,
    source: str,
    stats: LogStats,
    offset: int = 0,
    keep: Keep | None = None,
    hold_partial: bool = False,
    stop: int | None = None,
) -> Iterator[tuple[NetObservation, int]]:
    """Observations for the names `keep` accepts, each with the offset just after its line, from
    the lines starting before `stop` (None: to the end). See `squid_records`."""
    tag = f"squid:{path.name}:"
    for (ts, first, client, server, host, size), line_start, end in squid_records(
        path, stats=stats, offset=offset, keep=keep, hold_partial=hold_partial, stop=stop
    ):
        yield (
            NetObservation(source, ts, client, server, host, "log", size, first, ts, tag + str(line_start)),
            end,
        )


def squid_records(
    path: Path,
    *,
    stats: LogStats,
    offset: int = 0,
    keep: Keep | None = None,
    hold_partial: bool = False,
    stop: int | None = None,
) -> Iterator[tuple[Parsed, int, int]]:
    """What `read_squid` makes its observations of: each good line's fields, where it starts and
    the offset just after it (`inspect` writes its JSON straight from these: no object per line).

    The hot path: the log is read a block of lines at a time; in a block with no comment and no
    `[` (so no common-format line), a native line is read only as far as its URL, and a CONNECT
    target or URL host seen before and not kept costs nothing more (see `auditd.sources.logscan`,
    compiled with mypyc); any other line is read carefully.
    A name is remembered per CONNECT target and, apart, per URL up to the end of its authority (all
    its host depends on), so that `GET 1a://host/` never borrows what `GET http://host/` decided.
    """
    gz, start = start_of(path, offset)
    pos, n, lines, count_from = start, 0, 0, stats.count_from
    memo = _Memo(keep)
    with open_log(path, start) as fh:
        for block, whole in blocks(fh, hold_partial and not gz, stop):
            found: list[tuple[int, int, int, Parsed | str | None]]  # (start, end, line index, parsed)
            if whole and pos >= count_from and b"#" not in block and b"[" not in block:
                # Only lines naming something wanted or not seen yet come back.
                nlines, found = squid_lines(block, memo.connect, memo.other)
                lines += nlines  # less those found to be blank below
            else:
                found, nlines, at = [], 0, 0
                for raw in io.BytesIO(block):  # shares the block: iterating it is cheaper than a split
                    at += len(raw)
                    counts, got = memo.line(raw, raw.split(None, 7))
                    if counts and pos + at > count_from:
                        lines += 1
                    if got is not None:
                        found.append((at - len(raw), at, nlines, got))
                    nlines += 1
            for line_start, line_end, j, got in found:
                if got is None:  # (hot path) the memo may know the host by now, from an earlier line
                    counts, got = memo.again(block[line_start:line_end])
                    lines -= not counts
                    if got is None:
                        continue
                stats.end = end = pos + line_end
                if isinstance(got, str):
                    stats.skip(where(n + j + 1, start), got)
                    continue
                yield got, pos + line_start, end
            n += nlines
            pos += len(block)
    stats.end = pos
    stats.lines += lines


def _is_native(parts: list[bytes]) -> bool:
    return len(parts) == 8 and parts[3].find(b"/") > 0 and parts[3][0] != 91  # 91 is "["


class _Memo:
    """CONNECT target or URL prefix -> the host, if kept; and the careful reading of one line."""

    def __init__(self, keep: Keep | None) -> None:
        self.keep = keep
        self.connect: dict[bytes, str | None] = {}
        self.other: dict[bytes, str | None] = {}

    def again(self, raw: bytes) -> tuple[bool, Parsed | str | None]:
        """(counts as a line, what it says) for a line whose host was not known when its block was scanned."""
        host = squid_host(raw, self.connect, self.other)
        if host is UNSEEN:
            return self.line(raw, raw.split(None, 7))
        return True, None if host is None else squid_native(raw.split(), host)

    def line(self, raw: bytes, parts: list[bytes]) -> tuple[bool, Parsed | str | None]:
        """(counts as a line, what it says) for one line; `parts` is `raw.split(None, 7)`."""
        if _is_native(parts):
            url = parts[6]
            connect = parts[5] == b"CONNECT"
            memo, key = (self.connect, url) if connect else (self.other, url_key(url))
            host = memo.get(key, UNSEEN)
            if host is UNSEEN:
                name = url_host("CONNECT" if connect else "GET", url.decode("utf-8", "replace"))
                host = memo[key] = name if name and kept(name, self.keep, {}) else None
            return True, None if host is None else squid_native(raw.split(), host)
        if not parts or raw[:1] == b"#":
            return False, None
        got = _common(raw)
        if not isinstance(got, str) and not (got[4] and kept(got[4], self.keep, {})):
            return True, None
        return True, got


def _common(raw: bytes) -> Parsed | str:
    m = _COMMON.match(raw)
    if m is None:
        return "not a Squid native or common log line"
    try:
        ts = datetime.strptime(m["ts"].decode("latin-1"), "%d/%b/%Y:%H:%M:%S %z").astimezone(UTC)
    except ValueError:
        return f"bad time {m['ts'][:40].decode('latin-1')!r}"
    size = int(m["bytes"]) if m["bytes"] != b"-" else None
    host = url_host(m["method"].decode("latin-1"), m["url"].decode("utf-8", "replace"))
    return ts, ts, m["client"].decode("latin-1"), "", host, size
