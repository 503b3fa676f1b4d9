"""What every network-log reader shares: counting bad lines, opening plain or gzip files at an offset.

Kept apart from `netlogs` so that each format's module (zeek, suricata, squid, dnslog) can use it
without importing the dispatcher that imports them.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from auditd.errors import InputError

GZIP_MAGIC = b"\x1f\x8b"
BLOCK = 1 << 20  # read this much at a time: per-read costs vanish, and a block stays in cache

Keep = Callable[[str], bool]
"""A filter on names: a reader given one builds observations only for names it accepts (hot path)."""


@dataclass
class LogStats:
    """What one read of one log did; `first_skipped` names the first bad place ("line 17: why")."""

    lines: int = 0
    skipped: int = 0
    first_skipped: str | None = None
    end: int = 0  # offset just after the last complete line read: where the next read may resume
    count_from: int = 0  # lines ending at or before this offset were counted by an earlier read

    def skip(self, where: str, why: str) -> None:
        if self.end <= self.count_from:
            return
        self.skipped += 1
        if self.first_skipped is None:
            self.first_skipped = f"{where}: {why}"


def is_gzip(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(2) == GZIP_MAGIC
    except OSError:
        return False


def open_log(path: Path, offset: int = 0) -> BinaryIO:
    """The log's bytes from `offset` (plain files) or whole (gzip: no resuming inside a stream)."""
    try:
        fh: BinaryIO = path.open("rb")
        if fh.read(2) == GZIP_MAGIC:
            fh.close()
            return gzip.open(path, "rb")  # type: ignore[return-value]
        fh.seek(offset)
        return fh
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", where=str(path)) from None


def blocks(fh: BinaryIO, hold_partial: bool, stop: int | None = None) -> Iterator[tuple[bytes, bool]]:
    """The file's bytes as (block, True) blocks of whole lines (each ending in a newline), then the
    unterminated last line as (line, False), unless `hold_partial` (a line still being written).
    With `stop`, only the lines that start before that offset (one range of a file split for
    parallel reading: see `auditd.parallel`).

    Readers iterate a block's lines (`io.BytesIO(block)` shares it) and skip most of them without
    per-line bookkeeping; a block is completed with `readline`, so no bytes are copied twice.
    """
    left = -1 if stop is None else max(stop - fh.tell(), 0)  # bytes before `stop`; -1: to the end
    while left and (data := fh.read(BLOCK if left < 0 else min(BLOCK, left))):
        if data[-1] != 10:  # 10 is "\n"
            data += fh.readline()
            if data[-1] != 10:  # the end of the file, in an unterminated line
                cut = data.rfind(b"\n") + 1
                if cut:
                    yield data[:cut], True
                if not hold_partial:
                    yield data[cut:], False
                return
        if left > 0:
            left = max(left - len(data), 0)  # a line completed across `stop` ends the range
        yield data, True


def lines(
    fh: BinaryIO, start: int, stats: LogStats, *, hold_partial: bool, gz: bool, stop: int | None = None
) -> Iterator[tuple[int, bytes, int]]:
    """The non-blank lines from `start` as (line number, line, offset just after it), keeping the
    stats' bookkeeping: where the next read may resume, and which lines an earlier read counted.
    An unterminated last line of a plain file is held back when `hold_partial` (still being written);
    with `stop`, only the lines that start before that offset are read."""
    pos = start
    for n, raw in enumerate(fh, 1):
        if stop is not None and pos >= stop:
            return
        if hold_partial and not gz and not raw.endswith(b"\n"):
            return
        pos += len(raw)
        stats.end = pos
        if not raw.strip():
            continue
        if pos > stats.count_from:
            stats.lines += 1
        yield n, raw, pos


def head_lines(path: Path, limit: int = 30, max_bytes: int = 64 * 1024) -> list[bytes]:
    """The first non-blank lines of a file (gzip too), for sniffing its format; [] when unreadable."""
    try:
        with open_log(path) as fh:
            data = fh.read(max_bytes)
    except (InputError, OSError, EOFError, zlib.error, gzip.BadGzipFile):
        return []
    lines = [ln.strip(b"\r") for ln in data.split(b"\n")]
    if len(data) == max_bytes and len(lines) > 1:
        lines.pop()  # the last one may be cut
    return [ln for ln in lines if ln.strip()][:limit]


def where(lineno: int, start_offset: int) -> str:
    """A place a person can find: a line number when read from the start, else a byte offset."""
    return f"line {lineno}" if start_offset == 0 else f"line {lineno} after byte {start_offset}"


def start_of(path: Path, offset: int) -> tuple[bool, int]:
    """(is gzip, where reading really starts): a gzip file is always read from its start."""
    gz = is_gzip(path)
    return gz, 0 if gz else offset


def kept(name: str, keep: Keep | None, memo: dict[str, bool]) -> bool:
    """`keep(name)`, asked once per distinct name."""
    if keep is None:
        return True
    hit = memo.get(name)
    if hit is None:
        hit = memo[name] = keep(name)
    return hit


def strip_port(host: str) -> str:
    """`name:443` -> `name`; `[2001:db8::1]:443` -> `2001:db8::1`; a bare IPv6 address is left alone."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() and ":" not in name else host
