"""Hostile input through the command a sysadmin types: `inspect` never lets an exception escape.

Each example is a file made from a real seed (the sample school's capture and mail, the shipped
log samples, small pcapng and QUIC-bearing captures) by truncating it, flipping bytes, splicing
garbage in, or replacing it with random bytes, then given to `choysez-auditd inspect` in-process
(`auditd.cli.main`, the real entry point). The contract: exit 0 (read what could be read; skipped
records are counted on one stderr line) or exit 2 with exactly one stderr line naming the file.
Never a traceback, never another status.
"""

from __future__ import annotations

import contextlib
import io
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auditd.cli import main
from tests.conftest import ROOT, SAMPLE

DATA = ROOT / "tests" / "data"
EXAMPLES = 120
TRIED: dict[str, int] = {}


def _pcapng_seed() -> bytes:
    """A little-endian pcapng with one Ethernet interface and a DNS query in an enhanced packet block."""
    shb = struct.pack("<IIIHHq", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1) + struct.pack("<I", 28)
    idb = struct.pack("<IIHHI", 1, 20, 1, 0, 262144) + struct.pack("<I", 20)
    dns = bytes.fromhex("0001010000010000000000000377777707" + "6e6574666c6978" + "03636f6d0000010001")
    udp = struct.pack("!HHHH", 40000, 53, 8 + len(dns), 0) + dns
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, bytes([10, 20, 12, 34]), bytes(4)
    )
    frame = bytes(6) + bytes(6) + b"\x08\x00" + ip + udp
    pad = (-len(frame)) % 4
    length = 28 + len(frame) + pad + 4
    epb = struct.pack("<IIIIIII", 6, length, 0, 0, 0, len(frame), len(frame)) + frame + bytes(pad)
    return shb + idb + epb + struct.pack("<I", length)


def _seeds() -> dict[str, tuple[str, bytes]]:
    mail = sorted((SAMPLE / "mail" / "cur").iterdir())[0].read_bytes()
    return {
        "pcap": (".pcap", (SAMPLE / "captures" / "sample.pcap").read_bytes()[:60_000]),
        "pcapng": (".pcapng", _pcapng_seed()),
        "eml": (".eml", mail),
        "mbox": ("", b"From someone@example.net Mon Nov 23 09:00:00 2026\n" + mail + b"\n"),
        "zeek": (".log", (DATA / "logs" / "zeek" / "ssl.log").read_bytes()),
        "suricata": (".json", (DATA / "logs" / "suricata" / "eve.json").read_bytes()),
        "squid": (".log", (DATA / "logs" / "squid" / "access.log").read_bytes()),
        "dnsmasq": (".log", (DATA / "logs" / "dns" / "pihole.log").read_bytes()),
    }


SEEDS = _seeds()


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    how = draw(st.sampled_from(["truncate", "flip", "splice", "random", "repeat-header"]))
    if how == "truncate":
        return seed[: draw(st.integers(0, len(seed)))]
    if how == "flip":
        data = bytearray(seed)
        for _ in range(draw(st.integers(1, 40))):
            i = draw(st.integers(0, max(len(data) - 1, 0)))
            if data:
                data[i] = draw(st.integers(0, 255))
        return bytes(data)
    if how == "splice":
        at = draw(st.integers(0, len(seed)))
        return seed[:at] + draw(st.binary(min_size=1, max_size=400)) + seed[at:]
    if how == "repeat-header":
        return seed[:64] * draw(st.integers(1, 50))
    return draw(st.binary(max_size=2000))


def run_inspect(path: Path) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["inspect", str(path)])
    return code, err.getvalue()


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> object:
    yield
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items()))
    print(f"\nfuzzed inputs tried through inspect: {sum(TRIED.values())} ({kinds})")


@pytest.mark.parametrize("kind", sorted(SEEDS))
def test_inspect_survives_mutated_input(kind: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    suffix, seed = SEEDS[kind]
    folder = tmp_path_factory.mktemp(f"fuzz-{kind}")

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=mutated(seed))
    def check(data: bytes) -> None:
        path = folder / f"input{suffix}"
        path.write_bytes(data)
        TRIED[kind] = TRIED.get(kind, 0) + 1
        code, err = run_inspect(path)
        assert "Traceback" not in err
        assert code in (0, 2), (code, err)
        if code == 2:
            assert err.count("\n") == 1 and str(path) in err, err

    check()
