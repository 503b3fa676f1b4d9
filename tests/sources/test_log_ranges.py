"""Reading a log in ranges (`read_log(..., offset=, stop=)`): the ranges of a split file, read apart,
give what one read of the whole file gives, for every kind in SPLITTABLE, wherever the cut falls."""

from __future__ import annotations

from pathlib import Path

import pytest

from auditd.model import NetObservation
from auditd.sources.logio import blocks, open_log
from auditd.sources.netlogs import SPLITTABLE, LogStats, detect_log, read_log
from tests.conftest import ROOT

DATA = ROOT / "tests" / "data" / "logs"
SAMPLES = [
    "zeek/ssl.log",
    "zeek/dns.log",
    "zeek/http.log",
    "zeek-json/ssl.log",
    "squid/access.log",
    "squid/access-combined.log",
    "dns/pihole.log",
    "dns/named-queries.log",
    "dns/named-syslog.log",
]


def _read(path: Path, kind: str, start: int, stop: int | None) -> tuple[list[NetObservation], LogStats]:
    stats = LogStats()
    obs = [o for o, _ in read_log(path, kind, source="t", stats=stats, offset=start, stop=stop)]
    return obs, stats


def _line_starts(path: Path) -> list[int]:
    data = path.read_bytes()
    return [0] + [i + 1 for i, b in enumerate(data) if b == 10 and i + 1 < len(data)]


class TestRanges:
    """Two ranges cut at any line start read as the whole file does: same observations, same counts."""

    @pytest.mark.parametrize("name", SAMPLES)
    def test_every_cut_gives_the_whole(self, name: str) -> None:
        path = DATA / name
        kind = detect_log(path)
        assert kind in SPLITTABLE
        whole, wstats = _read(path, kind, 0, None)
        assert whole, "the sample must yield something for the test to mean anything"
        for cut in _line_starts(path)[1:]:
            first, s1 = _read(path, kind, 0, cut)
            second, s2 = _read(path, kind, cut, None)
            assert first + second == whole, f"cut at byte {cut}"
            assert s1.skipped + s2.skipped == wstats.skipped, f"cut at byte {cut}"
            assert s1.lines + s2.lines == wstats.lines, f"cut at byte {cut}"
            assert s1.end == cut

    def test_stop_inside_a_line_keeps_that_line(self, tmp_path: Path) -> None:
        log = tmp_path / "x.log"
        log.write_bytes(b"aaaa\nbbbb\ncccc\n")
        with open_log(log, 0) as fh:
            assert [b for b, _ in blocks(fh, False, 7)] == [b"aaaa\nbbbb\n"]
        with open_log(log, 5) as fh:
            assert [b for b, _ in blocks(fh, False, 10)] == [b"bbbb\n"]
        with open_log(log, 10) as fh:
            assert [b for b, _ in blocks(fh, False, 10)] == []

    def test_zeek_range_joins_conn_log_for_its_own_uids(self) -> None:
        path = DATA / "zeek" / "ssl.log"
        whole, _ = _read(path, "zeek", 0, None)
        assert any(o.bytes is not None for o in whole)
        cut = _line_starts(path)[len(_line_starts(path)) // 2]
        parts = _read(path, "zeek", 0, cut)[0] + _read(path, "zeek", cut, None)[0]
        assert [(o.host, o.bytes, o.first_seen) for o in parts] == [
            (o.host, o.bytes, o.first_seen) for o in whole
        ]
