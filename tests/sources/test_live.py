"""Live capture on the loopback interface: capture -> spool -> scan -> findings, spool emptied."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import COMMAND, Run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="live capture needs CAP_NET_RAW (run as root)")


def dns_query(name: str, qid: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\x00\x00\x01\x00\x01"


def live_config(school: Path, spool: Path) -> Path:
    config = school / "config.toml"
    text = config.read_text().replace(
        "[[network.rooms]]",
        "[[network.sources]]\n"
        'name = "gateway"\ntype = "live"\ninterface = "lo"\n'
        'bpf = "udp port 53"\n'
        f'spool = "{spool}"\nrotate_minutes = 1\n\n[[network.rooms]]',
        1,
    )
    config.write_text(text)
    return config


def test_capture_writes_a_private_spool_that_scan_reads_and_empties(
    cli: Run, school: Path, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    config = live_config(school, spool)
    proc = subprocess.Popen(
        [str(COMMAND), "capture", "--config", str(config), "--source", "gateway", "--duration", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert "capturing on lo" in proc.stdout.readline()  # printed once the socket is open
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(3):
            s.sendto(dns_query("www.netflix.com", 100 + i), ("127.0.0.1", 53))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    files = sorted(spool.glob("*.pcap"))
    assert len(files) == 1 and not list(spool.glob("*.part"))
    assert oct(files[0].stat().st_mode & 0o777) == oct(0o600)
    lines = [json.loads(x) for x in cli("inspect", files[0], check=True).stdout.splitlines()]
    names = {(x["host"], x["via"], x["service"]) for x in lines}
    assert ("www.netflix.com", "dns", "Netflix") in names
    assert "packets captured" in out and "WARNING" not in err

    report = cli("scan", "net", "--config", config, "--source", "gateway", check=True)
    assert "gateway:" in report.stdout
    assert not list(spool.glob("*.pcap"))  # ingested and deleted: a spool, not an archive


def test_capture_refuses_without_a_live_source(cli: Run, school: Path) -> None:
    proc = cli("capture", "--config", school / "config.toml")
    assert proc.returncode == 2
    assert "no live network source" in proc.stderr


def test_bad_interface_is_one_clear_error(cli: Run, school: Path, tmp_path: Path) -> None:
    config = live_config(school, tmp_path / "spool")
    config.write_text(config.read_text().replace('interface = "lo"', 'interface = "no-such-if0"'))
    proc = cli("capture", "--config", config, "--duration", "1")
    assert proc.returncode == 1
    assert "cannot capture on no-such-if0" in proc.stderr
    assert "Traceback" not in proc.stderr
