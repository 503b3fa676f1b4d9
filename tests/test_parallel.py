"""`inspect` on a big log in several processes: the same bytes out as one process, failures never silent.

The command runs as `python -m auditd.cli` from this checkout (so a copy of the tree tests its own
code), with CHOYSEZ_AUDITD_SPLIT_MIN=0 and CHOYSEZ_AUDITD_WORKERS=3 to split files of a few hundred KB.
Bad lines are written right beside the cuts, where a range's first or last line is easy to lose,
double or misnumber.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import random
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from auditd import parallel
from auditd.errors import AuditError
from auditd.sources.logio import LogStats
from tests.conftest import ROOT

LINES = 3000
STREAMING = [
    "www.netflix.com",
    "ipv4-c001-lhr001-ix.1.oca.nflxvideo.net",
    "www.nowtv.com",
    "www.disneyplus.com",
]
OTHER = ["classroom.google.com", "www.bbc.co.uk", "teams.microsoft.com"] + [
    f"e{i}.cdn.example.net" for i in range(50)
]
T0 = 1795511100.0
SPLIT = {parallel.ENV_MIN_SIZE: "0", parallel.ENV_WORKERS: "3"}
SERIAL = {parallel.ENV_WORKERS: "1"}


def _name(rng: random.Random) -> str:
    return rng.choice(STREAMING) if rng.random() < 0.2 else rng.choice(OTHER)


def zeek_tsv(folder: Path) -> Path:
    rng = random.Random(1)
    fields = ["ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "version", "server_name"]
    head = "#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n#unset_field\t-\n"
    ssl, conn = [head + "#path\tssl\n#fields\t" + "\t".join(fields) + "\n"], [head + "#path\tconn\n"]
    conn.append("#fields\tts\tuid\tid.orig_h\tduration\torig_ip_bytes\tresp_ip_bytes\n")
    for i in range(LINES):
        uid = f"C{i:017d}"
        ssl.append(
            f"{T0 + i:.6f}\t{uid}\t10.20.12.{i % 200}\t5{i % 9999:04d}\t198.51.100.7\t443\t"
            f"TLSv13\t{_name(rng)}\n"
        )
        if i % 3:
            conn.append(f"{T0 + i:.6f}\t{uid}\t10.20.12.{i % 200}\t{i % 60}.5\t{i * 10}\t{i * 1000}\n")
    ssl.append("#close\t2026-11-24-10-00-00\n")
    (folder / "conn.log").write_text("".join(conn))
    (folder / "ssl.log").write_text("".join(ssl))
    return folder / "ssl.log"


def zeek_json(folder: Path) -> Path:
    rng = random.Random(2)
    ssl, conn = [], []
    for i in range(LINES):
        uid = f"C{i:017d}"
        ssl.append(
            json.dumps(
                {
                    "ts": T0 + i,
                    "uid": uid,
                    "id.orig_h": f"10.20.12.{i % 200}",
                    "id.orig_p": 50000,
                    "id.resp_h": "198.51.100.7",
                    "id.resp_p": 443,
                    "version": "TLSv13",
                    "server_name": _name(rng),
                    "established": True,
                }
            )
            + "\n"
        )
        if i % 2:
            conn.append(
                json.dumps(
                    {
                        "ts": T0 + i,
                        "uid": uid,
                        "id.orig_h": "10.20.12.1",
                        "duration": 3.5,
                        "orig_bytes": i,
                        "resp_bytes": 1000 * i,
                        "conn_state": "SF",
                    }
                )
                + "\n"
            )
    (folder / "conn.log").write_text("".join(conn))
    (folder / "ssl.log").write_text("".join(ssl))
    return folder / "ssl.log"


def suricata(folder: Path) -> Path:
    rng = random.Random(3)
    out = []
    for i in range(LINES):
        ts = f"2026-11-24T09:{i // 60 % 60:02d}:{i % 60:02d}.000000+0000"
        ev = {
            "timestamp": ts,
            "flow_id": 1000 + i // 2,
            "event_type": "tls",
            "src_ip": "10.20.12.34",
            "src_port": 50000,
            "dest_ip": "198.51.100.7",
            "dest_port": 443,
            "tls": {"sni": _name(rng)},
        }
        if i % 2:
            ev = {
                "timestamp": ts,
                "flow_id": 1000 + (i - 61) // 2,
                "event_type": "flow",
                "src_ip": "10.20.12.34",
                "dest_ip": "198.51.100.7",
                "flow": {"bytes_toserver": i, "bytes_toclient": 9 * i, "start": ts, "end": ts},
            }
        out.append(json.dumps(ev) + "\n")
    (folder / "eve.json").write_text("".join(out))
    return folder / "eve.json"


def squid(folder: Path) -> Path:
    rng = random.Random(4)
    out = []
    for i in range(LINES):
        name = _name(rng)
        req = f"CONNECT {name}:443" if i % 4 else f"GET http://{name}/p/{i}?q=1"
        out.append(
            f"{T0 + i:.3f} {i % 5000:6d} 10.20.12.{i % 200} TCP_TUNNEL/200 {i * 7} {req} - "
            f"HIER_DIRECT/198.51.100.{i % 250} -\n"
        )
    (folder / "access.log").write_text("".join(out))
    return folder / "access.log"


def dnsmasq(folder: Path) -> Path:
    rng = random.Random(5)
    out = []
    for i in range(LINES):
        name = _name(rng)
        clock = f"09:{i // 60 % 60:02d}:{i % 60:02d}"
        out.append(f"Nov 24 {clock} dnsmasq[612]: query[A] {name} from 10.20.12.{i % 200}\n")
        out.append(f"Nov 24 {clock} dnsmasq[612]: forwarded {name} to 1.1.1.1\n")
    (folder / "pihole.log").write_text("".join(out))
    return folder / "pihole.log"


MAKERS: dict[str, Callable[[Path], Path]] = {
    "zeek-tsv": zeek_tsv,
    "zeek-json": zeek_json,
    "suricata": suricata,
    "squid": squid,
    "dnsmasq": dnsmasq,
}


def cuts_of(path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    for key, value in SPLIT.items():
        monkeypatch.setenv(key, value)
    return [start for start, _ in parallel.plan(path, detect_kind(path))[1:]]


def detect_kind(path: Path) -> str:
    from auditd.sources.netlogs import detect_log

    kind = detect_log(path)
    assert kind is not None
    return kind


def poison(path: Path, cuts: list[int], *, before: bool, after: bool) -> int:
    """Overwrite the lines beside each cut with garbage of the same length (so the cuts stay put)."""
    data = bytearray(path.read_bytes())
    spoilt = 0
    for cut in cuts:
        places = []
        if before:
            places.append(data.rfind(b"\n", 0, cut - 1) + 1)
        if after:
            places.append(cut)
        for start in places:
            end = data.index(b"\n", start)
            data[start:end] = (b"garbage " * (end - start))[: end - start]
            spoilt += 1
    path.write_bytes(bytes(data))
    return spoilt


def inspect(path: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "auditd.cli", "inspect", str(path), *extra],
        cwd=ROOT,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **env},
        capture_output=True,
        timeout=60,
        check=False,
    )


class TestPlan:
    """Which files are split, and where."""

    def test_small_files_are_not_split_by_default(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv(parallel.ENV_MIN_SIZE, raising=False)
        monkeypatch.delenv(parallel.ENV_WORKERS, raising=False)
        path = squid(tmp_path)
        assert parallel.plan(path, "squid") == [(0, path.stat().st_size)]

    @pytest.mark.parametrize("fmt", ["zeek-tsv", "zeek-json", "squid", "dnsmasq"])
    def test_cuts_fall_at_line_starts_and_cover_the_file(
        self, fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = MAKERS[fmt](tmp_path)
        cuts = cuts_of(path, monkeypatch)
        ranges = parallel.plan(path, detect_kind(path))
        data = path.read_bytes()
        assert len(ranges) == 3
        assert ranges[0][0] == 0 and ranges[-1][1] == len(data)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        assert all(data[c - 1] == 10 and data[c] != ord("#") for c in cuts)

    def test_suricata_gzip_and_a_second_zeek_header_are_read_whole(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for key, value in SPLIT.items():
            monkeypatch.setenv(key, value)
        eve = suricata(tmp_path)
        assert len(parallel.plan(eve, "suricata")) == 1  # records wait for flow events further on
        gz = tmp_path / "access.log.gz"
        gz.write_bytes(gzip.compress(squid(tmp_path).read_bytes()))
        assert len(parallel.plan(gz, "squid")) == 1
        ssl = zeek_tsv(tmp_path)
        text = ssl.read_text().splitlines(keepends=True)
        header = [ln for ln in text if ln.startswith("#") and not ln.startswith("#close")]
        ssl.write_text("".join([*text[: LINES // 2], "#close\tx\n", *header, *text[LINES // 2 :]]))
        assert len(parallel.plan(ssl, "zeek")) == 1


class TestSameOutput:
    """Split or not, `inspect` writes the same bytes and reports the same skipped lines."""

    @pytest.mark.parametrize("fmt", list(MAKERS))
    def test_bad_lines_beside_the_cuts(
        self, fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = MAKERS[fmt](tmp_path)
        cuts = cuts_of(path, monkeypatch)
        if fmt == "suricata":  # not split: must still give the same output with the variables set
            cuts = [path.stat().st_size // 3, path.stat().st_size * 2 // 3]
            cuts = [path.read_bytes().index(b"\n", c) + 1 for c in cuts]
        spoilt = poison(path, cuts, before=True, after=True)
        serial = inspect(path, SERIAL, "--only-matches")
        split = inspect(path, SPLIT, "--only-matches")
        assert serial.returncode == 0, serial.stderr
        assert split.returncode == 0, split.stderr
        assert serial.stdout.count(b"\n") > 100
        assert split.stdout == serial.stdout
        assert split.stderr == serial.stderr
        assert f"{spoilt} lines skipped".encode() in serial.stderr

    @pytest.mark.parametrize("fmt", ["zeek-tsv", "squid"])
    def test_first_bad_line_in_a_later_range_keeps_its_line_number(
        self, fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = MAKERS[fmt](tmp_path)
        cuts = cuts_of(path, monkeypatch)
        poison(path, cuts[1:], before=False, after=True)
        serial = inspect(path, SERIAL, "--only-matches")
        split = inspect(path, SPLIT, "--only-matches")
        line = path.read_bytes()[: cuts[1]].count(b"\n") + 1
        assert f"1 lines skipped; first: line {line}: ".encode() in serial.stderr
        assert split.stderr == serial.stderr
        assert split.stdout == serial.stdout

    def test_every_line_as_a_table(self, tmp_path: Path) -> None:
        path = squid(tmp_path)
        serial = inspect(path, SERIAL, "--format", "table")
        split = inspect(path, SPLIT, "--format", "table")
        assert serial.stdout.count(b"\n") == LINES
        assert split.stdout == serial.stdout


class TestFailure:
    """A worker that fails fails the command: exit 1, one line naming the file and the range."""

    def test_worker_that_cannot_write_its_output(self, tmp_path: Path) -> None:
        path = squid(tmp_path)

        def small_files() -> None:  # a worker's temporary file may not grow past 4 KB; stdout is a pipe
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

        proc = subprocess.run(
            [sys.executable, "-m", "auditd.cli", "inspect", str(path)],
            cwd=ROOT,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **SPLIT},
            capture_output=True,
            timeout=60,
            check=False,
            preexec_fn=small_files,
        )
        assert proc.returncode == 1
        lines = proc.stderr.decode().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"choysez-auditd: {path}: bytes ")
        assert "worker process failed" in lines[0] and "File too large" in lines[0]

    def test_worker_killed_by_a_signal(self, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
        path = tmp_path / "x.log"
        path.write_bytes(b"a\n" * 300)
        ranges = [(0, 200), (200, 400), (400, 600)]

        def work(start: int, stop: int) -> LogStats:
            if start == 200:
                os.kill(os.getpid(), signal.SIGKILL)
            sys.stdout.write(f"{start}-{stop}\n")
            return LogStats(lines=(stop - start) // 2)

        with pytest.raises(AuditError) as caught, parallel.Workers(path, ranges, work) as team:
            team.finish(work(*ranges[0]))
        assert caught.value.exit_code == 1
        assert str(caught.value) == f"{path}: bytes 200-400: worker process killed by signal 9 (SIGKILL)"
        workers = [part.pid for part in team.parts[1:]]
        assert len(workers) == 2 and all(pid > 0 for pid in workers)
        for pid in workers:  # every worker was reaped (the suite's own servers are children too)
            with pytest.raises(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)

    def test_outputs_in_order_and_stats_merged(
        self, tmp_path: Path, capfd: pytest.CaptureFixture[str]
    ) -> None:
        path = tmp_path / "x.log"
        path.write_bytes(b"a\n" * 300)
        ranges = [(0, 200), (200, 400), (400, 600)]

        def work(start: int, stop: int) -> LogStats:
            sys.stdout.write(f"{start}-{stop}\n" * 1000)
            stats = LogStats(lines=(stop - start) // 2, end=stop)
            if start > 0:
                stats.skip(f"line 3 after byte {start}", "bad")
                stats.skipped += 1
            return stats

        with parallel.Workers(path, ranges, work) as team:
            merged = team.finish(work(*ranges[0]))
            assert team.done() == 600
        out = capfd.readouterr().out
        assert out == "0-200\n" * 1000 + "200-400\n" * 1000 + "400-600\n" * 1000
        assert (merged.lines, merged.skipped, merged.first_skipped) == (300, 4, "line 103: bad")
