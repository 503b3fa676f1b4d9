"""Zeek logs: dns, ssl, http and quic records as observations, with bytes joined from conn.log.

Both of Zeek's writers are read: the TSV one (`#separator`, `#fields`, `#types` header lines, `-` for
unset, `(empty)` for an empty set, `#close`) and JSON lines (`LogAscii::use_json`, or the
json-streaming-logs package's `_path`/`_write_ts` with ISO time-stamps). Field lists follow Zeek 6-7
(`ts uid id.orig_h id.orig_p id.resp_h id.resp_p ...`); extra columns (`_node_name`, `ja3`) are fine
because fields are found by name.

A name record has no byte counts: those are in conn.log, written when the connection ends. When a
conn.log for the same period lies beside the log (same folder, same rotation suffix: `ssl.log` and
`conn.log`, `ssl.09:00:00-10:00:00.log.gz` and `conn.09:00:00-10:00:00.log.gz`), records are joined
to it by `uid` and carry the flow's bytes (IP bytes both ways; payload bytes when those are unset)
and its span (`ts` to `ts + duration`). Without it, bytes stay None. A connection still open when
its conn.log was rotated is written to the next period's conn.log and is missed (bytes None).
DNS records never carry bytes: the bytes of a lookup say nothing about viewing.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from auditd.model import NetObservation
from auditd.sources.logio import Keep, LogStats, blocks, kept, open_log, start_of, strip_port, where
from auditd.sources.logscan import Record, TsvLayout, tsv_lines, tsv_record

NAME_FIELD = {"dns": "query", "ssl": "server_name", "http": "host", "quic": "server_name"}
_PATH_IN_NAME = re.compile(r"(?<![A-Za-z])(dns|ssl|http|quic)(?![A-Za-z])")


@dataclass
class Header:
    """A TSV log's header: how fields are separated and what `-`/`(empty)` are spelt as here."""

    sep: bytes = b"\t"
    unset: bytes = b"-"
    empty: bytes = b"(empty)"
    path: str = ""
    fields: list[str] = field(default_factory=list)
    idx: dict[str, int] = field(default_factory=dict)
    log: str = ""  # the #path, or what the fields say
    nfields: int = 0
    i_ts: int = -1
    i_uid: int = -1
    i_orig: int = -1
    i_resp: int = -1
    i_name: int = -1

    def index(self) -> None:
        self.idx = {name: i for i, name in enumerate(self.fields)}
        self.nfields = len(self.fields)
        self.log = self.path or _path_from_fields(self.fields)
        get = self.idx.get
        self.i_ts, self.i_uid = get("ts", -1), get("uid", -1)
        self.i_orig, self.i_resp = get("id.orig_h", -1), get("id.resp_h", -1)
        self.i_name = get(NAME_FIELD.get(self.log, ""), -1)
        if self.i_ts < 0 or self.i_name < 0:
            self.log = "" if self.log in NAME_FIELD else self.log  # cannot be read by the fast path

    def layout(self) -> TsvLayout:
        """What the block scanner needs of this header (taken again after each header line)."""
        return TsvLayout(
            self.sep,
            self.unset,
            self.log,
            self.nfields,
            self.i_ts,
            self.i_uid,
            self.i_orig,
            self.i_resp,
            self.i_name,
        )


def _unescape(value: bytes) -> bytes:
    """`\\x09` -> a tab; a broken escape is kept as written (its lines then fail to split, and count)."""
    if b"\\x" not in value:
        return value
    try:
        return value.decode("unicode_escape").encode("latin-1")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return value


def header_line(h: Header, raw: bytes) -> None:
    """Apply one `#...` line to the header (a later `#fields` replaces the earlier one)."""
    key, _, value = raw.rstrip(b"\r\n").partition(b" " if raw.startswith(b"#separator") else h.sep)
    if key == b"#separator":
        h.sep = _unescape(value.strip()) or b"\t"
    elif key == b"#unset_field":
        h.unset = value
    elif key == b"#empty_field":
        h.empty = value
    elif key == b"#path":
        h.path = value.decode("utf-8", "replace").strip()
        if h.fields:
            h.index()
    elif key == b"#fields":
        h.fields = value.decode("utf-8", "replace").split(h.sep.decode("latin-1"))
        h.index()


def read_header(path: Path) -> Header:
    """The header at the top of a TSV log, so that reading can resume in the middle of the file."""
    h = Header()
    with open_log(path) as fh:
        for raw in fh:
            if not raw.startswith(b"#"):
                break
            header_line(h, raw)
    return h


def log_path_of(path: Path) -> str:
    """Which Zeek log a file is (dns, ssl, conn ...): its `#path` or `_path`, else from its fields."""
    with open_log(path) as fh:
        for raw in fh:
            if raw.startswith(b"#path"):
                return raw.rstrip(b"\r\n").partition(b"\t")[2].decode("utf-8", "replace").strip()
            if raw.startswith(b"#fields"):
                return _path_from_fields(raw.decode("utf-8", "replace").split())
            if raw.startswith(b"{"):
                try:
                    obj = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    return str(obj.get("_path") or _path_from_fields(list(obj)))
            elif raw.strip() and not raw.startswith(b"#"):
                break
    return ""


def _path_from_fields(names: list[str]) -> str:
    s = set(names)
    if "client_initial_dcid" in s:
        return "quic"
    if "server_name" in s and ("cipher" in s or "ssl_history" in s or "version" in s):
        return "ssl"
    if ("query" in s and "qtype" in s) or ("query" in s and "rcode" in s):
        return "dns"
    if "host" in s and "method" in s:
        return "http"
    if "conn_state" in s or "orig_bytes" in s:
        return "conn"
    return ""


def conn_sibling(path: Path, log: str) -> Path | None:
    """conn.log for the same period: same folder, the log's name with `conn` for `ssl`/`dns`/..."""
    matches = [m for m in _PATH_IN_NAME.finditer(path.name) if m.group(1) == log]
    if not matches:
        return None
    m = matches[-1]
    candidate = path.with_name(path.name[: m.start()] + "conn" + path.name[m.end() :])
    name = candidate.name
    alt = candidate.with_name(name[:-3] if name.endswith(".gz") else name + ".gz")
    return next((c for c in (candidate, alt) if c.is_file()), None)


def _records(
    path: Path,
    offset: int,
    stats: LogStats,
    hold_partial: bool,
    want: frozenset[str],
    keep: Keep | None = None,
    stop: int | None = None,
) -> Iterator[tuple[int, int, Record]]:
    """(offset after the line, line number, record) for records naming something `keep` accepts,
    from the lines starting before `stop` (None: to the end).

    The hot path: the log is read a block of lines at a time; in a block with no header line, a TSV
    line is read only as far as its name, and a name seen before and not kept costs nothing more
    (see `auditd.sources.logscan`, compiled with mypyc: no offset or count kept per line, the
    block's count is taken at once). Blocks with header lines, JSON logs and conn.log take the
    careful path, line by line.
    """
    gz, start = start_of(path, offset)
    h = read_header(path) if start > 0 else Header()
    t = h.layout()
    memo: dict[bytes, str | None] = {}  # raw name field -> the name, or None: unset or not kept
    pos, n, lines, count_from = start, 0, 0, stats.count_from

    def careful(raw: bytes) -> tuple[bool, Record | str | None]:
        """(counts as a line, record) for a line that is not a header line."""
        if not raw.strip():
            return False, None
        if raw[:1] == b"{":
            rec = _json_record(raw, want)
            if rec is not None and not isinstance(rec, str) and rec[0] != "conn":
                name = rec[5] if rec[0] == "dns" else strip_port(rec[5])
                kept_it = kept(name, keep, {})
                rec = (rec[0], rec[1], rec[2], rec[3], rec[4], name, 0.0, None) if kept_it else None
            return True, rec
        if h.log in want and h.log in NAME_FIELD:
            parts = raw.rstrip(b"\r\n").split(h.sep)
            if len(parts) != h.nfields:
                return True, f"expected {h.nfields} fields, got {len(parts)}"
            got = memo[parts[h.i_name]] = _name(parts[h.i_name], h, keep)
            return True, None if got is None else tsv_record(parts, t, got)
        return True, _tsv_record(raw, h, want)

    def unseen(raw: bytes) -> tuple[bool, Record | str | None]:
        """(counts as a line, record) for a line whose name was not known when its block was scanned."""
        try:
            got = memo[raw.split(t.sep, t.i_name + 1)[t.i_name]]
        except (KeyError, IndexError):
            return careful(raw)
        return True, None if got is None else tsv_record(raw.rstrip(b"\r\n").split(t.sep), t, got)

    with open_log(path, start) as fh:
        for block, whole in blocks(fh, hold_partial and not gz, stop):
            if whole and pos >= count_from and h.log in want and h.log in NAME_FIELD and b"#" not in block:
                # The hot path: only lines naming something wanted or not seen yet come back.
                nlines, found = tsv_lines(block, t, memo)
                uncounted = 0
                for line_start, line_end, j, rec in found:
                    if rec is None:  # the memo may know the name by now (from an earlier line)
                        counts, rec = unseen(block[line_start:line_end])
                        uncounted += not counts
                        if rec is None:
                            continue
                    stats.end = end = pos + line_end
                    if isinstance(rec, str):
                        stats.skip(where(n + j + 1, start), rec)
                        continue
                    yield end, n + j + 1, rec
                lines += nlines - uncounted
                n += nlines
                pos += len(block)
                continue
            for raw in io.BytesIO(block):  # shares the block: iterating it is cheaper than a split
                n += 1
                pos += len(raw)
                if raw[:1] == b"#":
                    header_line(h, raw)
                    t = h.layout()
                    memo.clear()
                    continue
                counts, rec = careful(raw)
                if counts and pos > count_from:
                    lines += 1
                if rec is None:
                    continue
                stats.end = pos
                if isinstance(rec, str):
                    stats.skip(where(n, start), rec)
                    continue
                yield pos, n, rec
    stats.end = pos
    stats.lines += lines


def _name(raw: bytes, h: Header, keep: Keep | None) -> str | None:
    """The name a TSV field holds, if set and kept (an http Host or an odd SNI loses its port)."""
    if raw in (h.unset, h.empty):
        return None
    name = raw.decode("utf-8", "replace")
    if h.log != "dns":
        name = strip_port(name)
    return name if kept(name, keep, {}) else None


def _tsv_record(raw: bytes, h: Header, want: frozenset[str]) -> Record | str | None:
    """A conn record (or a name record of a log read by fields alone)."""
    if not h.fields:
        return "data line before any #fields header"
    log = h.log
    if log not in want:
        return None
    parts = raw.rstrip(b"\r\n").split(h.sep)
    if len(parts) != len(h.fields):
        return f"expected {len(h.fields)} fields, got {len(parts)}"
    idx, unset, empty = h.idx, h.unset, h.empty

    def get(name: str) -> str:
        i = idx.get(name)
        if i is None:
            return ""
        v = parts[i]
        return "" if v in (unset, empty) else v.decode("utf-8", "replace")

    ts = get("ts")
    if not ts:
        return "missing field ts"
    if log == "conn":
        return (log, ts, get("uid"), "", "", "", _num(get("duration")), _conn_bytes(get))
    name = get(NAME_FIELD[log])
    if not name:
        return None
    return (log, ts, get("uid"), get("id.orig_h"), get("id.resp_h"), name, 0.0, None)


def _num(text: str) -> float:
    try:
        return float(text) if text else 0.0
    except ValueError:
        return 0.0


def _conn_bytes(get: object) -> int | None:
    from collections.abc import Callable
    from typing import cast

    g = cast(Callable[[str], str], get)
    for a, b in (("orig_ip_bytes", "resp_ip_bytes"), ("orig_bytes", "resp_bytes")):
        x, y = g(a), g(b)
        if x.isdigit() or y.isdigit():
            return (int(x) if x.isdigit() else 0) + (int(y) if y.isdigit() else 0)
    return None


def _json_record(raw: bytes, want: frozenset[str]) -> Record | str | None:
    try:
        obj = json.loads(raw)
    except ValueError:
        return "not JSON"
    if not isinstance(obj, dict):
        return "not a JSON object"
    log = str(obj.get("_path") or _path_from_fields(list(obj)))
    if log not in want:
        return None
    ts = obj.get("ts")
    if not isinstance(ts, (int, float, str)) or isinstance(ts, bool):
        return "missing field ts"

    def get(name: str) -> str:
        v = obj.get(name)
        return "" if v is None else str(v)

    if log == "conn":
        return (log, ts, get("uid"), "", "", "", _num(get("duration")), _conn_bytes(get))
    name = get(NAME_FIELD[log])
    if not name:
        return None
    return (log, ts, get("uid"), get("id.orig_h"), get("id.resp_h"), name, 0.0, None)


def parse_ts(ts: float | str) -> datetime:
    """Zeek time: epoch seconds (TSV and default JSON) or ISO 8601 (json-streaming-logs)."""
    if isinstance(ts, str):
        try:
            return datetime.fromtimestamp(float(ts), UTC)
        except ValueError:
            moment = datetime.fromisoformat(ts)
            return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return datetime.fromtimestamp(ts, UTC)


@dataclass(frozen=True)
class Flow:
    bytes: int | None
    first: datetime
    last: datetime


def conn_index(path: Path, uids: set[str] | None) -> dict[str, Flow]:
    """uid -> the connection's bytes and span, for the uids asked for (all when None)."""
    out: dict[str, Flow] = {}
    stats = LogStats()
    for _, _, rec in _records(path, 0, stats, False, frozenset(("conn",))):
        if uids is not None and rec[2] not in uids:
            continue
        try:
            first = parse_ts(rec[1])
        except (ValueError, OverflowError, OSError):
            continue
        out[rec[2]] = Flow(rec[7], first, first + timedelta(seconds=rec[6]))
    return out


def read_zeek(
    path: Path,
    *,
    source: str,
    stats: LogStats,
    offset: int = 0,
    keep: Keep | None = None,
    hold_partial: bool = False,
    join_conn: bool = True,
    stop: int | None = None,
) -> Iterator[tuple[NetObservation, int]]:
    """Observations from a Zeek dns/ssl/http/quic log; conn.log and other logs yield none.

    With `stop`, only the lines starting before that offset (a range starting at `offset`: the
    header is read from the top of the file); the conn.log join indexes only that range's uids.
    """
    log = log_path_of(path)
    if log not in NAME_FIELD:
        stats.end = max(offset, path.stat().st_size)  # conn.log and the rest: nothing to read here
        return
    names = frozenset(NAME_FIELD)
    flows: dict[str, Flow] = {}
    conn = conn_sibling(path, log) if join_conn and log != "dns" else None
    if conn is not None:
        # First pass: only the uids that will be yielded, so a big conn.log costs little memory.
        first = _records(path, offset, LogStats(), hold_partial, names, keep, stop)
        wanted = {rec[2] for _, _, rec in first}
        flows = conn_index(conn, wanted)
    _, start = start_of(path, offset)
    for end, n, rec in _records(path, offset, stats, hold_partial, names, keep, stop):
        ts_raw, uid, orig = rec[1], rec[2], rec[3]
        try:
            ts = datetime.fromtimestamp(ts_raw, UTC) if isinstance(ts_raw, float) else parse_ts(ts_raw)
        except (ValueError, OverflowError, OSError):
            stats.skip(where(n, start), f"bad ts {str(ts_raw)[:40]!r}")
            continue
        if not orig:
            stats.skip(where(n, start), "missing field id.orig_h")
            continue
        flow = flows.get(uid)
        if flow is None:
            yield NetObservation(source, ts, orig, rec[4], rec[5], "log", None, None, None, uid or None), end
        else:
            yield (
                NetObservation(
                    source, ts, orig, rec[4], rec[5], "log", flow.bytes, flow.first, flow.last, uid
                ),
                end,
            )
