"""Reading one big plain log on several cores, with output identical to one process reading it all.

Why: the per-line work of the log readers and of `inspect` is already near Python's floor (~0.3 us a
line), so a million-line log takes ~1.5 s on one core where awk takes ~0.3 s. The lines of the kinds
in `SPLITTABLE` are read independently of one another (a Zeek TSV log given its header), so the file
is cut at line starts into ranges and each range is read by its own process.

Why fork: the CLI is a short-lived process that has already loaded the policy and the classifier;
a forked child has them at no cost (no pickling, no second start-up). Each worker writes its output
to an unlinked temporary file and sends its `LogStats` back over a pipe as JSON. The parent reads
range 0 itself, streaming to stdout as a serial read does, then waits for the workers in order and
copies their outputs after its own: the bytes written are those of one serial read. A worker that
fails (an exception, a signal) fails the command with one line naming the file and the range; its
output is never silently left out.

`CHOYSEZ_AUDITD_SPLIT_MIN` (bytes) and `CHOYSEZ_AUDITD_WORKERS` (processes; 1 never splits) override
the size from which a file is split and how many processes read it (tests use small files).
"""

from __future__ import annotations

import io
import json
import mmap
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from auditd.errors import AuditError, InputError
from auditd.progress import read_offset
from auditd.sources.logio import LogStats, is_gzip
from auditd.sources.netlogs import SPLITTABLE

ENV_MIN_SIZE = "CHOYSEZ_AUDITD_SPLIT_MIN"
ENV_WORKERS = "CHOYSEZ_AUDITD_WORKERS"
MIN_SIZE = 32 << 20  # below this, forking and copying cost more than they save
PER_PROCESS = 16 << 20  # at least this much for each process
MAX_PROCESSES = 4  # beyond this the parent's copying and the disk are the limit

Range = tuple[int, int]
Work = Callable[[int, int], LogStats]
"""Reads the lines starting in [start, stop) of the file, writing to `sys.stdout`."""


def cpus() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _env_int(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    return int(text) if text.isdigit() else None


def plan(path: Path, kind: str) -> list[Range]:
    """The ranges to read `path` in: [(0, size)] unless the file is big, plain and of a kind that splits.

    Cuts fall at line starts. A Zeek log is split only when no `#` line follows its data before
    the last cut (a second header, from logs joined end to end, would change how later lines read:
    a worker reads the header at the top only).
    """
    try:
        size = path.stat().st_size
    except OSError:
        return [(0, 0)]
    whole = [(0, size)]
    min_size = _env_int(ENV_MIN_SIZE)
    forced = _env_int(ENV_WORKERS)
    wanted = forced if forced is not None else min(cpus(), MAX_PROCESSES, size // PER_PROCESS)
    if kind not in SPLITTABLE or wanted < 2 or size < (MIN_SIZE if min_size is None else min_size):
        return whole
    if is_gzip(path):
        return whole
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            data_start = _header_end(mm) if kind == "zeek" else 0
            cuts = [0]
            for i in range(1, wanted):
                cut = mm.find(b"\n", max(size * i // wanted - 1, 0)) + 1 or size
                if cut > max(cuts[-1], data_start) and cut < size:
                    cuts.append(cut)
            if kind == "zeek" and _has_comment_line(mm, data_start, cuts[-1]):
                return whole
    except (OSError, ValueError):
        return whole
    return list(zip(cuts, [*cuts[1:], size], strict=True))


def _header_end(mm: mmap.mmap) -> int:
    """Where the first line not starting with `#` starts."""
    pos = 0
    while mm[pos : pos + 1] == b"#":
        nl = mm.find(b"\n", pos)
        if nl < 0:
            return len(mm)
        pos = nl + 1
    return pos


def _has_comment_line(mm: mmap.mmap, start: int, stop: int) -> bool:
    """Whether a line starting with `#` starts in [start, stop) (memchr-fast: `#` is rare in data)."""
    i = mm.find(b"#", start, stop)
    while i >= 0:
        if i == 0 or mm[i - 1] == 10:  # 10 is "\n"
            return True
        i = mm.find(b"#", i + 1, stop)
    return False


@dataclass
class Part:
    """One range and the process reading it (pid 0: this one)."""

    start: int
    stop: int
    pid: int = 0
    out: BinaryIO | None = None  # the worker's output
    reply: int = -1  # the read end of the worker's pipe
    seen: int = 0  # bytes of the range read, as last seen
    done: bool = False


class Workers:
    """`with Workers(path, ranges, work) as team: team.finish(work(*ranges[0]))`.

    Entering forks one worker per range after the first (before any progress thread starts: a fork
    copies only the forking thread, and a lock another thread held would stay held in the child).
    `finish` waits for them in order, appends their outputs to stdout, and returns the merged stats.
    Leaving early (an error, Ctrl-C) stops and reaps the workers still running.
    """

    def __init__(self, path: Path, ranges: list[Range], work: Work) -> None:
        self.path = path
        self.work = work
        self.parts = [Part(start, stop) for start, stop in ranges]

    def __enter__(self) -> Workers:
        import tempfile  # only here: it costs start-up time every other command would pay

        sys.stdout.flush()  # a child must not inherit unwritten output (it would be written twice)
        sys.stderr.flush()
        try:
            for part in self.parts[1:]:
                part.out = tempfile.TemporaryFile()
                part.reply, write_end = os.pipe()
                part.pid = os.fork()
                if part.pid == 0:
                    os.close(part.reply)
                    self._child(part, write_end)  # never returns
                os.close(write_end)
        except BaseException:
            self._stop_all()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop_all()

    def _child(self, part: Part, write_end: int) -> None:
        """Read one range into the part's file, send the stats (or the error) back, and exit."""
        status = 0
        try:
            assert part.out is not None
            old = sys.stdout
            sys.stdout = io.TextIOWrapper(
                part.out,
                encoding=getattr(old, "encoding", None) or "utf-8",
                errors=getattr(old, "errors", None) or "strict",
                write_through=False,
            )
            stats = self.work(part.start, part.stop)
            sys.stdout.flush()
            reply: dict[str, object] = {
                "lines": stats.lines,
                "skipped": stats.skipped,
                "first_skipped": stats.first_skipped,
            }
        except BaseException as exc:  # everything goes back to the parent, as one line
            status = 1
            text = " ".join(str(exc).split()) or type(exc).__name__
            reply = {"error": text, "exit": exc.exit_code if isinstance(exc, AuditError) else 1}
        try:
            data = json.dumps(reply).encode()
            while data:
                data = data[os.write(write_end, data) :]
        finally:
            os._exit(status)  # no atexit handlers, no flushing of the parent's copied buffers

    def done(self) -> int:
        """Bytes of the file read so far by all the processes (for the progress bar)."""
        total = 0
        for part in self.parts:
            length = part.stop - part.start
            if part.done:
                total += length
                continue
            pos = read_offset(self.path, part.pid or None)
            if pos is not None:
                part.seen = max(part.seen, min(max(pos - part.start, 0), length))
            total += part.seen
        return total

    def finish(self, first: LogStats) -> LogStats:
        """Wait for the workers in order, append their outputs to stdout; all the ranges' stats merged."""
        self.parts[0].done = True
        merged = LogStats(lines=first.lines, skipped=first.skipped, first_skipped=first.first_skipped)
        for part in self.parts[1:]:
            reply = self._reap(part)
            assert part.out is not None
            sys.stdout.flush()
            part.out.seek(0)
            shutil.copyfileobj(part.out, sys.stdout.buffer, 1 << 20)
            sys.stdout.buffer.flush()
            part.out.close()
            part.out = None
            merged.lines += _int(reply.get("lines"))
            merged.skipped += _int(reply.get("skipped"))
            first_skipped = reply.get("first_skipped")
            if merged.first_skipped is None and isinstance(first_skipped, str):
                merged.first_skipped = self._exact(first_skipped, part.start)
        return merged

    def _reap(self, part: Part) -> dict[str, object]:
        """The worker's reply, once it has exited; raises when it failed."""
        chunks = []
        while chunk := os.read(part.reply, 1 << 16):
            chunks.append(chunk)
        os.close(part.reply)
        part.reply = -1
        _, status = os.waitpid(part.pid, 0)
        part.done = True
        where = f"{self.path}: bytes {part.start}-{part.stop}"
        try:
            reply = json.loads(b"".join(chunks))
        except ValueError:
            reply = None
        if isinstance(reply, dict) and "error" in reply:
            if reply.get("exit") == InputError.exit_code:
                raise InputError(f"worker process failed: {reply['error']}", where=where)
            raise AuditError(f"worker process failed: {reply['error']}", where=where)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            raise AuditError(
                f"worker process killed by signal {sig} ({signal.Signals(sig).name})", where=where
            )
        if os.waitstatus_to_exitcode(status) != 0 or not isinstance(reply, dict):
            raise AuditError(f"worker process exited {os.waitstatus_to_exitcode(status)}", where=where)
        return reply

    def _exact(self, place: str, start: int) -> str:
        """`line N after byte START: why` as `line M: why`, counting the lines before START."""
        m = re.match(rf"line (\d+) after byte {start}(: .*)?$", place, re.S)
        if m is None:
            return place
        before = 0
        try:
            with self.path.open("rb") as fh:
                left = start
                while left > 0 and (data := fh.read(min(left, 1 << 20))):
                    before += data.count(b"\n")
                    left -= len(data)
        except OSError:
            return place
        return f"line {before + int(m[1])}{m[2] or ''}"

    def _stop_all(self) -> None:
        for part in self.parts[1:]:
            if part.pid > 0 and not part.done:
                try:
                    os.kill(part.pid, signal.SIGTERM)
                    os.waitpid(part.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                part.done = True
            if part.reply >= 0:
                os.close(part.reply)
                part.reply = -1
            if part.out is not None:
                part.out.close()
                part.out = None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
