"""Network scans across rotated captures: a session split over two files and two scans is one session."""

from __future__ import annotations

import json
import shutil
import struct
from datetime import UTC, datetime
from pathlib import Path

from tests.conftest import SAMPLE, Run

SPLIT_AT = datetime(2026, 11, 23, 9, 15, tzinfo=UTC).timestamp()


def split_pcap(source: Path, first: Path, second: Path, at: float) -> tuple[int, int]:
    """Write the records before `at` to `first` and the rest to `second` (classic pcap, as rotated)."""
    data = source.read_bytes()
    header, pos = data[:24], 24
    parts: tuple[list[bytes], list[bytes]] = ([], [])
    while pos < len(data):
        sec, usec, incl, _orig = struct.unpack_from("<IIII", data, pos)
        record = data[pos : pos + 16 + incl]
        parts[0 if sec + usec / 1e6 < at else 1].append(record)
        pos += 16 + incl
    first.write_bytes(header + b"".join(parts[0]))
    second.write_bytes(header + b"".join(parts[1]))
    return len(parts[0]), len(parts[1])


def streaming(cli: Run, config: Path) -> list[dict[str, object]]:
    found = json.loads(cli("findings", "--config", config, "--format", "json", check=True).stdout)
    return [f for f in found if f["rule"] == "NET-STREAMING-IN-CLASS"]


def evidence(f: dict[str, object]) -> dict[str, object]:
    items = f["evidence"]
    assert isinstance(items, list) and len(items) == 1
    result: dict[str, object] = items[0]
    return result


def test_a_session_split_over_two_rotated_files_and_scans_is_one_session(cli: Run, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    shutil.copytree(SAMPLE, whole, ignore=shutil.ignore_patterns("auditd.db*", "out"))
    cli("scan", "net", "--config", whole / "config.toml", check=True)
    reference = {str(f["subject"]["room"]): f for f in streaming(cli, whole / "config.toml")}  # type: ignore[index]

    rotated = tmp_path / "rotated"
    shutil.copytree(SAMPLE, rotated, ignore=shutil.ignore_patterns("auditd.db*", "out", "captures"))
    captures = rotated / "captures"
    captures.mkdir()
    later = tmp_path / "later.pcap"
    n1, n2 = split_pcap(SAMPLE / "captures" / "sample.pcap", captures / "a.pcap", later, SPLIT_AT)
    assert n1 > 100 and n2 > 100
    config = rotated / "config.toml"
    cli("scan", "net", "--config", config, check=True)
    shutil.move(later, captures / "b.pcap")  # the next rotation arrives
    second = cli("scan", "net", "--config", config, check=True)
    assert "sample-captures:" in second.stdout

    found = {str(f["subject"]["room"]): f for f in streaming(cli, config)}  # type: ignore[index]
    assert set(found) == set(reference) == {"Room 12", "Room 14"}
    netflix, whole_netflix = evidence(found["Room 12"]), evidence(reference["Room 12"])
    # One session, seen whole: from the first TLS handshake to the end of the video flow.
    assert netflix["first_seen"] == whole_netflix["first_seen"]
    assert netflix["last_seen"] == whole_netflix["last_seen"]
    assert abs(int(netflix["bytes"]) - int(whole_netflix["bytes"])) < 0.01 * int(whole_netflix["bytes"])  # type: ignore[call-overload]
    assert found["Room 12"]["occurrences"] == 1
    # The continuation had no handshake of its own: it was recognised by its connection.
    names = {(n["host"], n["via"]) for n in netflix["names"]}  # type: ignore[attr-defined]
    assert ("ipv4-c001-lhr001-ix.1.oca.nflxvideo.net", "tls-sni") in names
