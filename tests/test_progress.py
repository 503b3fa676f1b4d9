"""The progress bar: drawn on a terminal from how far the reader has got, never into a pipe."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import time
from pathlib import Path

from auditd.progress import FileProgress, read_offset, render
from tests.conftest import COMMAND, SAMPLE


class TestProgress:
    """What `inspect` shows on a terminal while it reads a large file."""

    def test_render_says_how_far_and_how_fast(self) -> None:
        line = render("big.pcap", 50_000_000, 200_000_000, 2.0)
        assert line.startswith("big.pcap: [#######")
        assert "25%" in line and "50/200 MB" in line and "25 MB/s" in line

    def test_offset_is_read_from_the_open_descriptor(self, tmp_path: Path) -> None:
        f = tmp_path / "data.bin"
        f.write_bytes(bytes(10_000))
        assert read_offset(f) is None
        with f.open("rb") as fh:
            fh.read(4096)
            assert read_offset(f) == 4096

    def test_draws_on_a_terminal_and_cleans_up(self, tmp_path: Path) -> None:
        f = tmp_path / "capture.pcap"
        f.write_bytes(bytes(4_000_000))
        master, slave = pty.openpty()
        try:
            terminal = os.fdopen(slave, "w", closefd=False)
            with FileProgress(f, terminal, min_size=1_000_000, interval=0.02) as progress, f.open("rb") as fh:
                assert progress.active
                while fh.read(400_000):
                    time.sleep(0.03)
            terminal.close()
            shown = ""
            while select.select([master], [], [], 0.2)[0]:
                shown += os.read(master, 65536).decode()
        finally:
            os.close(master)
            os.close(slave)
        assert "capture.pcap: [" in shown and "MB/s" in shown
        assert shown.endswith("\r\x1b[K")  # the line is cleared when reading ends

    def test_nothing_is_drawn_into_a_pipe_or_for_a_small_file(self, tmp_path: Path) -> None:
        f = tmp_path / "capture.pcap"
        f.write_bytes(bytes(4_000_000))
        piped = io.StringIO()
        with FileProgress(f, piped, min_size=1_000_000, interval=0.01) as progress, f.open("rb") as fh:
            fh.read()
            time.sleep(0.05)
        assert not progress.active and piped.getvalue() == ""
        master, slave = pty.openpty()
        try:
            small = FileProgress(f, os.fdopen(slave, "w", closefd=False), min_size=10_000_000)
            assert not small.active
        finally:
            os.close(master)
            os.close(slave)


class TestInspectShowsProgress:
    """`inspect` of a large capture into a file draws the bar on the terminal, and only there."""

    def test_bar_on_the_terminal_data_in_the_file(self, tmp_path: Path) -> None:
        sample = (SAMPLE / "captures" / "sample.pcap").read_bytes()
        header, records = sample[:24], sample[24:]
        big = tmp_path / "big.pcap"
        with big.open("wb") as fh:
            fh.write(header)
            while fh.tell() < 160_000_000:
                fh.write(records)  # the same day again: times repeat, which a reader must take
        out = tmp_path / "out.jsonl"
        master, slave = pty.openpty()
        try:
            with out.open("w") as stdout:
                proc = subprocess.run(
                    [str(COMMAND), "inspect", str(big), "--only-matches"],
                    stdout=stdout,
                    stderr=slave,
                    timeout=120,
                    check=False,
                )
            shown = ""
            while select.select([master], [], [], 0.2)[0]:
                shown += os.read(master, 65536).decode(errors="replace")
        finally:
            os.close(master)
            os.close(slave)
        assert proc.returncode == 0
        assert "big.pcap: [" in shown and "MB/s" in shown
        lines = out.read_text().splitlines()
        assert lines and all(line.startswith('{"kind": "net"') for line in lines)
