"""Suricata EVE JSON (`eve.json`): dns, tls, http and quic events as observations, bytes from flow events.

Events read (field names as in Suricata 5-8's EVE output):
- `dns`: the name from `dns.rrname` (EVE dns v1, one event per query or answer record; v2 answers),
  or `dns.queries[].rrname` (v3, Suricata 8). A query is one observation; an answer adds one only
  for a name whose query was not logged. The client is the side that is not port 53.
- `tls`: `tls.sni`; `http`: `http.hostname`; `quic`: `quic.sni`.
- `flow`: `flow.bytes_toserver + flow.bytes_toclient`, `flow.start`/`flow.end`, joined to the events
  above by `flow_id`. Suricata writes the flow event when the flow ends, after its tls/http events,
  so records wait for their flow until the end of what is read; a record whose flow event is not in
  the read yields without bytes. Each record is yielded with the offset just after its own line, so
  offsets are not in increasing order when records waited.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from auditd.model import NetObservation
from auditd.sources.logio import Keep, LogStats, kept, lines, open_log, start_of, where

DNS_PORTS = frozenset((53, 853, 5353, 5355))
NAMED = ("tls", "http", "quic")
_SEEN_CAP = 200_000


def parse_ts(text: str) -> datetime:
    """EVE time: ISO 8601 with an offset written without a colon (`+0100`)."""
    if len(text) > 5 and text[-5] in "+-" and text[-3] != ":":
        text = text[:-2] + ":" + text[-2:]
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _names(ev: dict[str, Any], kind: str, seen: set[tuple[object, str]]) -> list[str]:
    """The names one event contributes (dns answers only for names whose query went unlogged)."""
    body = ev.get(kind)
    if not isinstance(body, dict):
        return []
    if kind == "tls" or kind == "quic":
        sni = body.get("sni")
        return [sni] if isinstance(sni, str) and sni else []
    if kind == "http":
        host = body.get("hostname")
        return [host] if isinstance(host, str) and host else []
    names: list[str] = []
    rr = body.get("rrname")
    if isinstance(rr, str) and rr:
        names.append(rr)
    for q in body.get("queries") or ():
        if isinstance(q, dict) and isinstance(q.get("rrname"), str) and q["rrname"]:
            names.append(q["rrname"])
    key = ev.get("flow_id")
    if body.get("type") in ("query", "request"):
        if len(seen) > _SEEN_CAP:
            seen.clear()
        seen.update((key, n.lower()) for n in names)
        return names
    return [n for n in names if (key, n.lower()) not in seen]


def _ends(ev: dict[str, Any], kind: str) -> tuple[str, str] | None:
    src, dst = ev.get("src_ip"), ev.get("dest_ip")
    if not isinstance(src, str) or not isinstance(dst, str):
        return None
    if kind == "dns" and ev.get("src_port") in DNS_PORTS and ev.get("dest_port") not in DNS_PORTS:
        return dst, src  # a response logged in its own direction
    return src, dst


def read_suricata(
    path: Path,
    *,
    source: str,
    stats: LogStats,
    offset: int = 0,
    keep: Keep | None = None,
    hold_partial: bool = False,
    stop: int | None = None,
) -> Iterator[tuple[NetObservation, int]]:
    """Observations from the lines starting before `stop` (None: to the end); see the module doc.

    A range read alone is not a part of the whole read: a record waits for a flow event that may
    lie in a later range, and dns answers depend on the queries seen before them.
    """
    gz, start = start_of(path, offset)
    pending: dict[object, list[tuple[NetObservation, int]]] = {}
    seen: set[tuple[object, str]] = set()
    memo: dict[str, bool] = {}
    with open_log(path, start) as fh:
        for n, raw, pos in lines(fh, start, stats, hold_partial=hold_partial, gz=gz, stop=stop):
            try:
                ev = json.loads(raw)
            except ValueError:
                stats.skip(where(n, start), "not JSON")
                continue
            if not isinstance(ev, dict):
                stats.skip(where(n, start), "not a JSON object")
                continue
            kind = ev.get("event_type")
            if kind == "flow":
                waiting = pending.pop(ev.get("flow_id"), None)
                if waiting:
                    yield from _joined(waiting, ev.get("flow"))
                continue
            if kind != "dns" and kind not in NAMED:
                continue
            names = [h for h in _names(ev, kind, seen) if kept(h, keep, memo)]
            if not names:
                continue
            ts_text = ev.get("timestamp")
            ends = _ends(ev, kind)
            if not isinstance(ts_text, str):
                stats.skip(where(n, start), "missing field timestamp")
                continue
            if ends is None:
                stats.skip(where(n, start), "missing field src_ip or dest_ip")
                continue
            try:
                ts = parse_ts(ts_text)
            except ValueError:
                stats.skip(where(n, start), f"bad timestamp {ts_text[:40]!r}")
                continue
            fid = ev.get("flow_id")
            flow = str(fid) if isinstance(fid, int | str) and not isinstance(fid, bool) else None
            for name in names:
                o = NetObservation(source, ts, ends[0], ends[1], name, "log", flow=flow)
                if kind == "dns" or flow is None:
                    yield o, pos
                else:
                    pending.setdefault(fid, []).append((o, pos))
    for waiting in pending.values():
        yield from waiting


def _joined(waiting: list[tuple[NetObservation, int]], flow: object) -> Iterator[tuple[NetObservation, int]]:
    total: int | None = None
    first = last = None
    if isinstance(flow, dict):
        up, down = flow.get("bytes_toserver"), flow.get("bytes_toclient")
        if isinstance(up, int) or isinstance(down, int):
            total = (up if isinstance(up, int) else 0) + (down if isinstance(down, int) else 0)
        try:
            first = parse_ts(flow["start"]) if isinstance(flow.get("start"), str) else None
            last = parse_ts(flow["end"]) if isinstance(flow.get("end"), str) else None
        except ValueError:
            first = last = None
    for o, end in waiting:
        yield (
            NetObservation(
                o.source, o.ts, o.client, o.server, o.host, o.via, total, first, last or first, o.flow
            ),
            end,
        )
