"""Network logs as observations: Zeek, Suricata EVE, Squid access.log, dnsmasq/Pi-hole and BIND query logs.

The interface, for the CLI and the pipeline:

    LOG_KINDS = ("zeek", "suricata", "squid", "dnsmasq", "bind")
    detect_log(path) -> kind | None
        Sniffs the first lines (gzip too). None when the file is not a log this package reads.
    read_log(path, kind, *, source, stats, offset=0, tz=UTC, keep=None, hold_partial=False, stop=None)
        -> Iterator[(NetObservation, offset just after the line it came from)]
        Bad lines (garbage, missing fields, wrong types) are skipped and counted in `stats`, which
        also keeps the first place ("line 17: missing field ts") and `end`, the offset after the last
        complete line read. Raises only InputError, for a file that is not that kind of log at all.
        `tz` is the zone of time-stamps that have none (dnsmasq, BIND); `keep` filters names before
        observations are built (the hot path of a big log); `hold_partial` leaves an unterminated
        last line (still being written) for the next read. `stop` ends the read at the lines that
        start before it (`offset` and `stop` a range of line starts, for reading one file in parallel:
        `SPLITTABLE` are the kinds whose ranges, read apart, give what one read of the whole gives).
    resume_point(path, checkpoint) -> Resume   and   checkpoint_for(path, offset, context) -> str
        Following a growing log between runs (below).

Every record maps to one `NetObservation` per name with `via` "log" (CONTRACT.md): `client` the
originator, `server` the responder ("" when the log does not say), `ts` in UTC, `bytes`,
`first_seen`/`last_seen` the flow's totals and span where the log (or a log joined to it) gives
them, `flow` the flow's id (Zeek uid, Suricata flow_id, a Squid line's place). Each format's module
says what exactly it reads: `zeek`, `suricata`, `squid`, `dnslog`.

Following a log. A checkpoint is `v1 DEV-INODE OFFSET CONTEXT HEADLEN HEADHASH`: the file's identity,
where new data starts, where the re-read window starts (see the pipeline), and a hash of its first
bytes (up to 1 KB). On the next run the same file grown resumes at OFFSET; a file that shrank below
OFFSET (truncated), or whose identity or first bytes changed (rotated: a new file under the old
name), starts at 0, and the rotated-away file, when found beside it by identity (`name.1`,
`name-20261124`, ...), is read from where it was left to its end first. Gzip files cannot be
resumed inside: they are read whole once and checkpointed as `gz DEV-INODE SIZE MTIME`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, tzinfo
from pathlib import Path

from auditd.errors import InputError
from auditd.model import NetObservation
from auditd.sources.dnslog import BIND, BIND_SNIFF, DNSMASQ, read_dnslog
from auditd.sources.logio import Keep, LogStats, head_lines, is_gzip
from auditd.sources.squid import _COMMON, read_squid
from auditd.sources.suricata import read_suricata
from auditd.sources.zeek import read_zeek

__all__ = [
    "LOG_KINDS",
    "SPLITTABLE",
    "LogStats",
    "Resume",
    "checkpoint_for",
    "detect_log",
    "read_log",
    "resume_point",
]

LOG_KINDS = ("zeek", "suricata", "squid", "dnsmasq", "bind")
# Kinds whose lines are read independently of the lines before them (given a Zeek TSV header):
# not Suricata, whose records wait for flow events further on and whose dns answers depend on earlier queries.
SPLITTABLE = frozenset(("zeek", "squid", "dnsmasq", "bind"))
HEAD = 1024
_SQUID_NATIVE = re.compile(rb"^\d{9,11}(?:\.\d+)?\s+\d+\s+\S+\s+[A-Z_]+/\d{3}\s+\d+\s+\S+\s+\S+")
_ZEEK_JSON_KEYS = ("uid", "id.orig_h")


def _kind_of_line(line: bytes) -> str | None:
    if line.startswith((b"#separator", b"#fields", b"#path")):
        return "zeek"
    if line.startswith(b"{"):
        try:
            obj = json.loads(line)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        if "event_type" in obj and "timestamp" in obj:
            return "suricata"
        if "_path" in obj or all(k in obj for k in _ZEEK_JSON_KEYS):
            return "zeek"
        return None
    if _SQUID_NATIVE.match(line) or _COMMON.match(line):
        return "squid"
    if DNSMASQ.match(line):
        return "dnsmasq"
    if BIND_SNIFF.search(line) and BIND.match(line):
        return "bind"
    return None


def detect_log(path: Path) -> str | None:
    """Which log a file is, from its first lines (gzip too); None when none of LOG_KINDS."""
    votes: dict[str, int] = {}
    for line in head_lines(path):
        if line.startswith(b"#") and not line.startswith((b"#separator", b"#fields", b"#path")):
            continue  # comments (a btest baseline's first line, Squid's none)
        kind = _kind_of_line(line)
        if kind == "zeek" and line.startswith(b"#"):
            return kind
        if kind is not None:
            votes[kind] = votes.get(kind, 0) + 1
            if votes[kind] >= 3:
                return kind
    return max(votes, key=lambda k: votes[k]) if votes else None


def read_log(
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
    """Observations from a log of `kind`, each with the offset just after its line (see the module doc)."""
    if kind not in LOG_KINDS:
        raise InputError(f"unknown log kind {kind!r} (one of {', '.join(LOG_KINDS)})", where=str(path))
    if not path.is_file():
        raise InputError("no such file", where=str(path))
    if kind == "zeek":
        return read_zeek(
            path, source=source, stats=stats, offset=offset, keep=keep, hold_partial=hold_partial, stop=stop
        )
    if kind == "suricata":
        return read_suricata(
            path, source=source, stats=stats, offset=offset, keep=keep, hold_partial=hold_partial, stop=stop
        )
    if kind == "squid":
        return read_squid(
            path, source=source, stats=stats, offset=offset, keep=keep, hold_partial=hold_partial, stop=stop
        )
    return read_dnslog(
        path,
        kind,
        source=source,
        stats=stats,
        offset=offset,
        tz=tz,
        keep=keep,
        hold_partial=hold_partial,
        stop=stop,
    )


# ---- following a log between runs ------------------------------------------------------------


@dataclass(frozen=True)
class Resume:
    """Where to read a log from this run.

    `offset`: new data starts here; `context`: re-read from here (<= offset) to see again what the
    last run saw of the current window; `done`: a gzip file already read whole; `rotated`: the file
    that was under this name last time, to be read from `rotated_context` to its end first.
    """

    offset: int = 0
    context: int = 0
    done: bool = False
    rotated: Path | None = None
    rotated_offset: int = 0
    rotated_context: int = 0


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}-{st.st_ino}"


def _head_hash(path: Path, length: int) -> str:
    with path.open("rb") as fh:
        return hashlib.sha256(fh.read(length)).hexdigest()[:16]


def checkpoint_for(path: Path, offset: int, context: int | None = None) -> str:
    """The checkpoint after reading `path` up to `offset` (re-read window from `context`)."""
    st = path.stat()
    if is_gzip(path):
        return f"gz {st.st_dev}-{st.st_ino} {st.st_size} {st.st_mtime_ns}"
    head = min(HEAD, offset)
    ctx = offset if context is None else min(context, offset)
    return f"v1 {st.st_dev}-{st.st_ino} {offset} {ctx} {head} {_head_hash(path, head)}"


def resume_point(path: Path, checkpoint: str | None) -> Resume:
    """Decide where to resume `path` given the checkpoint the last run left (None: from the start)."""
    if not checkpoint:
        return Resume()
    parts = checkpoint.split()
    st = path.stat()
    if parts[0] == "gz":
        same = parts[1:] == [f"{st.st_dev}-{st.st_ino}", str(st.st_size), str(st.st_mtime_ns)]
        return Resume(done=same)
    if parts[0] != "v1" or len(parts) != 6 or not all(p.isdigit() for p in parts[2:5]):
        return Resume()
    identity, offset, context, head, digest = parts[1], int(parts[2]), int(parts[3]), int(parts[4]), parts[5]
    if is_gzip(path):
        # compressed since (logrotate's compress): what was read is in it, but offsets do not apply
        return Resume(done=identity == _identity(path))
    if identity == _identity(path) and st.st_size >= offset and _head_hash(path, head) == digest:
        return Resume(offset=offset, context=context)
    old = _rotated_away(path, identity)
    if old is not None and old.stat().st_size >= offset and _head_hash(old, head) == digest:
        return Resume(rotated=old, rotated_offset=offset, rotated_context=context)
    return Resume()


def _rotated_away(path: Path, identity: str) -> Path | None:
    """The file beside `path` (`name.1`, `name-20261124`, ...) that has the identity `identity`."""
    try:
        siblings = [p for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path]
    except OSError:
        return None
    for p in sorted(siblings):
        try:
            if p.is_file() and not is_gzip(p) and _identity(p) == identity:
                return p
        except OSError:
            continue
    return None
