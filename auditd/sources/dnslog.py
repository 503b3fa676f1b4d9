"""DNS server query logs: dnsmasq (and Pi-hole, which writes dnsmasq's format) and BIND 9.

dnsmasq with `log-queries` (Pi-hole's `/var/log/pihole/pihole.log` is the same format):
`Nov 24 09:05:01 dnsmasq[123]: query[A] www.netflix.com from 10.20.12.34`, optionally with a
syslog host name before the program, `log-queries=extra`'s serial and client before `query[`, or an
RFC 3339 time-stamp (rsyslog). Only `query[...]` lines name a lookup; `forwarded`, `reply`, `cached`
and `config` lines are the answer's path and are read past. The server is not stated: "".

BIND 9 `querylog` (`category queries`), from 9.9's form to 9.18's:
`24-Nov-2026 09:05:01.123 queries: info: client @0x7f... 10.20.12.34#5353 (www.netflix.com): query:
www.netflix.com IN A +E(0)K (10.0.0.1)`, the `@0x...`, `queries: info:` and `view NAME:` parts being
optional, or the same after a syslog prefix (`Nov 24 09:05:01 ns1 named[123]: client ...`). The
address in the last brackets is the server's own address the query came to.

These time-stamps have no zone (and syslog's no year): they are read in `tz` (the organisation's
zone; UTC by default), and a missing year is the file's last-modified year, or the year before for a
date that would otherwise lie after the file was last written (December lines read in January).
DNS lookups carry no bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path

from auditd.model import NetObservation
from auditd.sources.logio import Keep, LogStats, kept, lines, open_log, start_of, where

_MONTHS = {
    m: i
    for i, m in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}
_SYSLOG_TS = rb"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d(?:\.\d+)?"
_ISO_TS = rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?"
_BIND_TS = rb"\d\d-[A-Z][a-z]{2}-\d{4} \d\d:\d\d:\d\d(?:\.\d+)?"

DNSMASQ = re.compile(
    rb"^(?P<ts>"
    + _SYSLOG_TS
    + rb"|"
    + _ISO_TS
    + rb") (?:\S+ )?(?:dnsmasq|pihole-FTL)\[\d+\]: (?P<msg>.*?)\s*$"
)
_DNSMASQ_QUERY = re.compile(rb"^(?:\d+ \S+ )?query\[(?P<qtype>[\w-]+)\] (?P<name>\S+) from (?P<client>\S+)$")

BIND = re.compile(
    rb"^(?P<ts>"
    + _BIND_TS
    + rb"|"
    + _SYSLOG_TS
    + rb"(?: \S+ named\[\d+\]:)?|"
    + _ISO_TS
    + rb"(?: \S+ named\[\d+\]:)?) "
    rb"(?:\S+: )?(?:(?:info|notice|debug(?: \d+)?): )?client (?:@0x[0-9a-fA-F]+ )?(?P<msg>.*?)\s*$"
)
_BIND_QUERY = re.compile(
    rb"^(?P<client>[^\s#]+)#\d+(?: \([^)]*\))?: (?:view [^:]+: )?query: (?P<name>\S+) \S+ (?P<qtype>\S+) "
    rb"\S+ \((?P<server>[^)]*)\)"
)
# What a BIND line looks like at all, for sniffing: "client ... query: NAME IN TYPE"
BIND_SNIFF = re.compile(rb"client (?:@0x[0-9a-fA-F]+ )?[^\s#]+#\d+.*: query: \S+ \S+ \S+")


class Clock:
    """Turns a zone-less, maybe year-less time-stamp into UTC, remembering the last one read."""

    def __init__(self, tz: tzinfo, mtime: datetime) -> None:
        self.tz = tz
        self.latest = mtime.astimezone(tz) + timedelta(days=1)
        self.last_text = b""
        self.last: datetime | None = None

    def parse(self, text: bytes) -> datetime:
        if text == self.last_text and self.last is not None:
            return self.last
        s = text.decode("ascii")
        if s[4:5] == "-" and "T" in s:  # RFC 3339
            moment = datetime.fromisoformat(s.replace("Z", "+00:00"))
            moment = moment.replace(tzinfo=self.tz) if moment.tzinfo is None else moment
        elif s[2:3] == "-":  # BIND: 24-Nov-2026 09:05:01.123
            day, mon, rest = s.split("-", 2)
            year, clock = rest.split(" ", 1)
            moment = self._at(int(year), _MONTHS[mon.lower()], int(day), clock)
        else:  # syslog: Nov 24 09:05:01
            mon, day, clock = s.split(None, 2)
            clock = clock.split()[0]
            moment = self._at(self.latest.year, _MONTHS[mon.lower()], int(day), clock)
            if moment > self.latest:
                moment = self._at(self.latest.year - 1, _MONTHS[mon.lower()], int(day), clock)
        self.last_text, self.last = text, moment.astimezone(UTC)
        return self.last

    def _at(self, year: int, month: int, day: int, clock: str) -> datetime:
        hms, _, frac = clock.partition(".")
        h, m, sec = (int(x) for x in hms.split(":"))
        micro = int((frac + "000000")[:6]) if frac else 0
        return datetime(year, month, day, h, m, sec, micro, tzinfo=self.tz)


def read_dnslog(
    path: Path,
    kind: str,
    *,
    source: str,
    stats: LogStats,
    offset: int = 0,
    tz: tzinfo = UTC,
    keep: Keep | None = None,
    hold_partial: bool = False,
    stop: int | None = None,
) -> Iterator[tuple[NetObservation, int]]:
    """Lookups from a dnsmasq/Pi-hole (`kind` "dnsmasq") or BIND (`kind` "bind") query log, from
    the lines starting before `stop` (None: to the end)."""
    gz, start = start_of(path, offset)
    try:
        mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except OSError:
        mtime = datetime.now(UTC)
    clock = Clock(tz, mtime)
    line_re, query_re = (DNSMASQ, _DNSMASQ_QUERY) if kind == "dnsmasq" else (BIND, _BIND_QUERY)
    memo: dict[str, bool] = {}
    with open_log(path, start) as fh:
        for n, raw, pos in lines(fh, start, stats, hold_partial=hold_partial, gz=gz, stop=stop):
            m = line_re.match(raw)
            if m is None:
                if kind == "bind" and b" client " not in raw:
                    continue  # another category's line in a shared channel: not a query line
                stats.skip(where(n, start), f"not a {kind} log line")
                continue
            q = query_re.match(m["msg"])
            if q is None:
                continue  # forwarded/reply/cached (dnsmasq), denied/refused (BIND)
            name = q["name"].decode("utf-8", "replace").rstrip(".")
            if not name or not kept(name, keep, memo):
                continue
            try:
                ts = clock.parse(m["ts"])
            except (ValueError, KeyError):
                stats.skip(where(n, start), f"bad time {m['ts'].decode('latin-1')!r}")
                continue
            server = q["server"].decode("latin-1") if kind == "bind" else ""
            yield NetObservation(source, ts, q["client"].decode("latin-1"), server, name, "log"), pos
