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

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from auditd.model import NetObservation
from auditd.sources.logio import Keep, LogStats, kept, open_log, start_of, strip_port, where

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
) -> Iterator[tuple[NetObservation, int]]:
    gz, start = start_of(path, offset)
    memo: dict[bytes, str | None] = {}  # CONNECT target or URL host -> the name, if kept
    tag = f"squid:{path.name}:"
    pos = start
    count_from = stats.count_from
    hold = hold_partial and not gz
    lines = 0
    with open_log(path, start) as fh:
        for n, raw in enumerate(fh, 1):
            if hold and raw[-1:] != b"\n":
                break
            line_start = pos
            pos += len(raw)
            got: Parsed | str | None
            # The hot path (native format): split as far as the URL; go on only for a name wanted.
            parts = raw.split(None, 7)
            if len(parts) == 8 and parts[3].find(b"/") > 0 and parts[3][0] != 91:  # 91 is "["
                if pos > count_from:
                    lines += 1
                url = parts[6]
                connect = parts[5] == b"CONNECT"
                key = url if connect else url.split(b"/", 3)[2] if b"://" in url else b""
                try:
                    host = memo[key]
                except KeyError:
                    name = url_host("CONNECT" if connect else "GET", url.decode("utf-8", "replace"))
                    host = memo[key] = name if name and kept(name, keep, {}) else None
                if host is None:
                    continue
                got = _native(raw.split(), host)
            elif not parts or raw[:1] == b"#":
                continue
            else:
                if pos > count_from:
                    lines += 1
                got = _common(raw)
                if not isinstance(got, str) and not (got[4] and kept(got[4], keep, {})):
                    got = None
            if got is None:
                continue
            if isinstance(got, str):
                stats.end = pos
                stats.skip(where(n, start), got)
                continue
            stats.end = pos
            ts, elapsed, client, server, host, size = got
            first = ts - elapsed if elapsed else ts
            yield (
                NetObservation(
                    source, ts, client, server, host, "log", size, first, ts, tag + str(line_start)
                ),
                pos,
            )
    stats.end = pos
    stats.lines += lines


Parsed = tuple[datetime, timedelta | None, str, str, str, int | None]


def _native(p: list[bytes], host: str) -> Parsed | str:
    if len(p) < 9:
        return f"expected at least 9 fields, got {len(p)}"
    try:
        ts = datetime.fromtimestamp(float(p[0]), UTC)
    except (ValueError, OverflowError, OSError):
        return f"bad time {p[0][:40].decode('latin-1')!r}"
    try:
        elapsed = timedelta(milliseconds=int(p[1]))
        size = int(p[4])
    except ValueError:
        return "elapsed or bytes is not a number"
    peer = p[8].partition(b"/")[2]
    server = "" if peer in (b"", b"-") else peer.decode("utf-8", "replace")
    return ts, elapsed, p[2].decode("latin-1"), server, host, size


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
    return ts, None, m["client"].decode("latin-1"), "", host, size
