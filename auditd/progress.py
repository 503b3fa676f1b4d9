"""A progress bar on a terminal while a large file is read, drawn from the reader's own offset.

The readers stream their files and know nothing of terminals; this watches, from a thread, how
far the process has read into the file (Linux: `/proc/self/fdinfo`), and redraws one line on
stderr. Nothing is drawn unless stderr is a terminal and the file is large, so pipes, logs and
tests see only the data.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TextIO

MIN_SIZE = 32 * 1024 * 1024
WIDTH = 30


def read_offset(path: Path, pid: int | None = None) -> int | None:
    """How far this process (or process `pid`, a worker) has read into `path` (the largest offset
    of its open descriptors)."""
    target = str(path.resolve())
    proc = f"/proc/{pid or 'self'}"
    best: int | None = None
    try:
        fds = os.listdir(f"{proc}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(f"{proc}/fd/{fd}") != target:
                continue
            with open(f"{proc}/fdinfo/{fd}") as info:
                for line in info:
                    if line.startswith("pos:"):
                        pos = int(line.split()[1])
                        best = pos if best is None else max(best, pos)
        except (OSError, ValueError):
            continue
    return best


def render(name: str, done: int, total: int, elapsed: float) -> str:
    """One line: name, bar, percentage, megabytes and rate."""
    frac = min(done / total, 1.0) if total else 1.0
    filled = int(frac * WIDTH)
    rate = done / elapsed / 1e6 if elapsed > 0 else 0.0
    bar = "#" * filled + "." * (WIDTH - filled)
    return f"{name}: [{bar}] {frac:4.0%} {done / 1e6:,.0f}/{total / 1e6:,.0f} MB {rate:,.0f} MB/s"


class FileProgress:
    """`with FileProgress(path, sys.stderr): read(path)` shows progress when it is worth showing."""

    def __init__(
        self,
        path: Path,
        stream: TextIO,
        *,
        min_size: int = MIN_SIZE,
        interval: float = 0.25,
        enabled: bool = True,
        done: Callable[[], int | None] | None = None,
    ) -> None:
        """`done` says how far the reading has got (default: this process's offset in the file;
        `auditd.parallel` sums its processes' ranges)."""
        self.path = path
        self.done = done or (lambda: read_offset(path))
        self.stream = stream
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self.total = path.stat().st_size if path.is_file() else 0
        except OSError:
            self.total = 0
        self.active = enabled and self.total >= min_size and _is_terminal(stream)

    def __enter__(self) -> FileProgress:
        if self.active:
            self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.stream.write("\r\x1b[K")  # leave the terminal as it was
            self.stream.flush()

    def _run(self) -> None:
        started = time.monotonic()
        wait = min(self.interval, 0.05)  # the first draw soon, then one each interval
        while not self._stop.wait(wait):
            wait = self.interval
            done = self.done()
            if done is not None:
                line = render(self.path.name, done, self.total, time.monotonic() - started)
                self.stream.write("\r" + line + "\x1b[K")
                self.stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
