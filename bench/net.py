"""Benchmark the capture reader against tshark and ndpiReader on a generated capture.

    .venv/bin/python bench/net.py [--size-mb 200] [--keep] [--file CAPTURE] [--repeat 3]

Builds a realistic capture in a temporary folder (bulk video TCP from a few servers after TLS
handshakes naming Netflix and others, DNS queries and answers, QUIC v1 Initials, client ACKs), then
times `choysez-auditd inspect --only-matches`, `read_capture` alone, tshark extracting the same
fields, and `ndpiReader -i`, each in a fresh process, the fastest of `--repeat` runs. Prints wall
time, peak RSS and ratios, and whether the capture reader is compiled (`make speedups`). A peer
tool that is not installed is skipped, with a note.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SNIS = [
    "ipv4-c001-lhr001-ix.1.oca.nflxvideo.net",
    "www.netflix.com",
    "linear012-gb-dash1-prd-ak.cdn.skycdp.com",
    "rr3---sn-aigzrn7e.googlevideo.com",
    "www.bbc.co.uk",
    "classroom.google.com",
    "teams.microsoft.com",
    "www.wikipedia.org",
]

# ---- packet crafting ----------------------------------------------------------------------------


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF


def _ip(src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0, src, dst)
    return head[:10] + struct.pack("!H", _csum(head)) + head[12:] + payload


def eth_tcp(src: bytes, dst: bytes, sport: int, dport: int, seq: int, flags: int, data: bytes = b"") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 1, 0x50, flags, 65535, 0, 0) + data
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + _ip(src, dst, 6, tcp)


def eth_udp(src: bytes, dst: bytes, sport: int, dport: int, data: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + _ip(src, dst, 17, udp)


def client_hello(sni: str) -> bytes:
    name = sni.encode()
    entry = b"\x00" + len(name).to_bytes(2, "big") + name
    ext = b"\x00\x00" + (len(entry) + 2).to_bytes(2, "big") + len(entry).to_bytes(2, "big") + entry
    ext += b"\x00\x2b\x00\x03\x02\x03\x04" + b"\x00\x15\x01\x00" + b"\x00" * 256
    body = b"\x03\x03" + bytes(32) + b"\x20" + bytes(32) + b"\x00\x04\x13\x01\x13\x02\x01\x00"
    body += len(ext).to_bytes(2, "big") + ext
    return b"\x01" + len(body).to_bytes(3, "big") + body


def dns(qid: int, name: str, answer: bool) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00\x00\x01\x00\x01"
    if not answer:
        return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q
    rr = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc6\x33\x64\x0a"
    return struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + q + rr


def _label(secret: bytes, label: bytes, length: int) -> bytes:
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00\x01"
    return hmac.new(secret, info, hashlib.sha256).digest()[:length]


def quic_initial(dcid: bytes, sni: str) -> bytes:
    """A QUIC v1 client Initial carrying a ClientHello (RFC 9001 section 5)."""
    salt = bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")
    secret = _label(hmac.new(salt, dcid, hashlib.sha256).digest(), b"client in", 32)
    key, iv, hp = (_label(secret, b"quic " + x, n) for x, n in ((b"key", 16), (b"iv", 12), (b"hp", 16)))
    hello = client_hello(sni)
    frames = b"\x06\x00" + (len(hello) | 0x4000).to_bytes(2, "big") + hello
    plain = frames + b"\x00" * (1162 - len(frames) - 16 - 4 - len(dcid))
    head = b"\xc3\x00\x00\x00\x01" + bytes([len(dcid)]) + dcid + b"\x00\x00"
    header = head + ((4 + len(plain) + 16) | 0x4000).to_bytes(2, "big") + (0).to_bytes(4, "big")
    sealed = AESGCM(key).encrypt(iv, plain, header)
    enc = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    mask = enc.update(sealed[:16]) + enc.finalize()
    out = bytearray(header + sealed)
    out[0] ^= mask[0] & 0x0F
    for i in range(4):
        out[len(header) - 4 + i] ^= mask[1 + i]
    return bytes(out)


def generate(path: Path, size_mb: int) -> tuple[int, int]:
    """Write a pcap of about `size_mb` MB: (packets, flows). Templates are crafted once per flow."""
    target = size_mb * 1_000_000
    rec = struct.Struct("<IIII")
    out = path.open("wb")
    out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
    written = 24
    packets = 0
    flows = 0
    ts = 1_764_000_000.0
    servers = [bytes([203, 0, 113, i]) for i in (10, 20, 30, 40)] + [bytes([23, 246, 11, 141])]
    resolver = bytes([10, 20, 0, 53])
    batch: list[bytes] = []

    def put(frame: bytes) -> None:
        nonlocal written, packets, ts
        ts += 0.00002
        sec = int(ts)
        batch.append(rec.pack(sec, int((ts - sec) * 1e6), len(frame), len(frame)))
        batch.append(frame)
        written += 16 + len(frame)
        packets += 1

    active: list[tuple[bytes, bytes, int, bytes, bytes, int]] = []
    n = 0
    while written < target:
        # keep about 40 video flows going; open a new one (DNS + handshake) when one ends
        while len(active) < 40:
            n += 1
            flows += 1
            client = bytes([10, 20, 12 + n % 3, 10 + n % 200])
            server = servers[n % len(servers)]
            sport = 20000 + n % 40000
            sni = SNIS[n % len(SNIS)]
            put(eth_udp(client, resolver, 30000 + n % 30000, 53, dns(n & 0xFFFF, sni, False)))
            put(eth_udp(resolver, client, 53, 30000 + n % 30000, dns(n & 0xFFFF, sni, True)))
            if n % 10 == 0:  # a QUIC connection: one Initial, some server datagrams
                put(eth_udp(client, server, sport, 443, quic_initial(n.to_bytes(8, "big"), sni)))
                for _ in range(20):
                    put(eth_udp(server, client, 443, sport, b"\x40" + bytes(1250)))
                continue
            put(eth_tcp(client, server, sport, 443, 0, 0x02))
            put(eth_tcp(server, client, 443, sport, 0, 0x12))
            hello = client_hello(sni) if n % 7 else b""  # some nameless flows (matched by address)
            if hello:
                put(
                    eth_tcp(
                        client,
                        server,
                        sport,
                        443,
                        1,
                        0x18,
                        b"\x16\x03\x01" + len(hello).to_bytes(2, "big") + hello,
                    )
                )
            for k in range(8):  # short web flows beside the video: handshake, a few packets, FIN
                wport = 40000 + (n * 8 + k) % 25000
                web = bytes([198, 51, 100, (n + k) % 250])
                wh = client_hello(f"site{(n * 8 + k) % 500}.example.org")
                put(eth_tcp(client, web, wport, 443, 0, 0x02))
                put(eth_tcp(web, client, 443, wport, 0, 0x12))
                wrec = b"\x16\x03\x01" + len(wh).to_bytes(2, "big") + wh
                put(eth_tcp(client, web, wport, 443, 1, 0x18, wrec))
                for _ in range(6):
                    put(eth_tcp(web, client, 443, wport, 1, 0x10, bytes(1200)))
                put(eth_tcp(client, web, wport, 443, 2, 0x11))
                put(eth_tcp(web, client, 443, wport, 2, 0x11))
            down = eth_tcp(server, client, 443, sport, 1, 0x10, bytes(1400))
            ack = eth_tcp(client, server, sport, 443, 1, 0x10)
            active.append((down, ack, 300 + (n * 37) % 900, client, server, sport))
        i = 0
        while i < len(active):
            down, ack, left, client, server, sport = active[i]
            put(down)
            if left % 2 == 0:
                put(ack)
            if left <= 1:
                put(eth_tcp(client, server, sport, 443, 2, 0x11))
                put(eth_tcp(server, client, 443, sport, 2, 0x11))
                active.pop(i)
                continue
            active[i] = (down, ack, left - 1, client, server, sport)
            i += 1
        if len(batch) > 20000:
            out.write(b"".join(batch))
            batch.clear()
    out.write(b"".join(batch))
    out.close()
    return packets, flows


# ---- measuring ----------------------------------------------------------------------------------

WRAPPER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"wall": wall, "rss_kb": rss, "rc": p.returncode, "lines": p.stdout.count(b"\\n")}))
"""


def measure(cmd: list[str], repeat: int) -> dict[str, float]:
    """The fastest of `repeat` runs (each in a fresh process), with the largest peak RSS seen."""
    runs = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout))
    best: dict[str, float] = min(runs, key=lambda r: r["wall"])
    best["rss_kb"] = max(r["rss_kb"] for r in runs)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--keep", action="store_true", help="keep the generated capture")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each tool; the fastest counts")
    ap.add_argument("--file", type=Path, help="benchmark this capture instead of generating one")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="auditd-bench-"))
    try:
        if args.file:
            cap = args.file
        else:
            cap = tmp / "bench.pcap"
            t = time.perf_counter()
            packets, flows = generate(cap, args.size_mb)
            print(
                f"generated {cap.stat().st_size / 1e6:.0f} MB, {packets} packets, {flows} flows "
                f"in {time.perf_counter() - t:.1f} s"
            )
        runs: dict[str, list[str]] = {}
        command = BIN / "choysez-auditd"
        if (ROOT / "policies" / "streaming.toml").exists() and command.exists():
            runs["choysez-auditd inspect"] = [str(command), "inspect", "--only-matches", str(cap)]
        runs["read_capture (python -c)"] = [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; "
            "from auditd.sources.pcap import CaptureStats, read_capture; "
            "n = sum(1 for _ in read_capture(Path(sys.argv[1]), source='b', stats=CaptureStats())); print(n)",
            str(cap),
        ]
        if shutil.which("tshark"):
            runs["tshark -T fields"] = [
                "tshark",
                "-r",
                str(cap),
                "-T",
                "fields",
                "-e",
                "dns.qry.name",
                "-e",
                "tls.handshake.extensions_server_name",
                "-e",
                "http.host",
            ]
        else:
            print("tshark not installed: skipped (apt-get install tshark)")
        if shutil.which("ndpiReader"):
            runs["ndpiReader -i"] = ["ndpiReader", "-q", "-i", str(cap)]
        else:
            print("ndpiReader not installed: skipped (apt-get install libndpi-bin)")
        compiled = subprocess.run(
            [sys.executable, "-c", "import auditd.sources.pcap as m; print(m.__file__.endswith('.so'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        print(
            "capture reader: "
            + (
                "compiled with mypyc"
                if compiled == "True"
                else "pure Python (run `make speedups` to compile)"
            )
        )
        results: dict[str, dict[str, float]] = {}
        size_mb = cap.stat().st_size / 1e6
        for name, cmd in runs.items():
            r = measure(cmd, args.repeat)
            results[name] = r
            print(
                f"{name:<28} {r['wall']:7.2f} s  {size_mb / r['wall']:7.0f} MB/s  "
                f"peak RSS {r['rss_kb'] / 1024:6.0f} MB  rc={r['rc']:.0f} lines={r['lines']:.0f}"
            )
        ours = results.get("choysez-auditd inspect") or results["read_capture (python -c)"]
        for peer in ("tshark -T fields", "ndpiReader -i"):
            if peer in results:
                print(
                    f"speed vs {peer}: {results[peer]['wall'] / ours['wall']:.2f}x (higher is better for us)"
                )
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
