"""Make the sample school's capture, `captures/sample.pcap`, with scapy.

    .venv/bin/python deploy/sample-school/make_capture.py

Monday 23 November 2026 (in term; GMT, so local time is UTC), as a classroom gateway would
record it with `tcpdump -s 512` on a host with receive offload, so that bulk video arrives in
large segments whose full length is in each record's original length while only the first
512 bytes are kept. What is in it, and what the demo should make of it:

- Room 12, 10.20.12.34: Netflix in P1 (DNS, TLS to www.netflix.com, 20 minutes of Open
  Connect video): a finding.
- Room 14, 10.20.14.21: Sky Go in P3 (Sky Sports live from skycdp.com, 18 minutes): a finding.
- Room 12, 10.20.12.40: a speed test (fast.com) and a teaching video on YouTube: no finding
  (fast.com is not viewing; YouTube is off by default).
- Room 12, 10.20.12.41: a Netflix DNS look-up and a 20 KB prefetch: too short, no finding.
- Staff room, 10.20.1.5: Netflix at lunch, not a classroom subnet: no finding.
- Room 14, 10.20.14.30: Netflix at 16:00, after the last lesson: no finding.
- Room 12, 10.20.12.34: bbc.co.uk (news page): not viewing by itself.

The output is byte-for-byte the same on every run (fixed ports, sequence numbers and times).
"""

from __future__ import annotations

import struct
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from scapy.all import DNS, DNSQR, DNSRR, IP, TCP, UDP, Ether, Raw, load_layer

load_layer("tls")
from scapy.layers.tls.extensions import ServerName, TLS_Ext_ServerName  # noqa: E402
from scapy.layers.tls.handshake import TLSClientHello  # noqa: E402
from scapy.layers.tls.record import TLS  # noqa: E402

SNAPLEN = 512
GATEWAY_MAC = "02:00:00:00:00:01"
RESOLVER = "10.20.0.53"
DAY = datetime(2026, 11, 23, tzinfo=UTC)

Record = tuple[float, bytes]


def at(hhmm: str, seconds: float = 0.0) -> float:
    h, m = map(int, hhmm.split(":"))
    return (DAY + timedelta(hours=h, minutes=m, seconds=seconds)).timestamp()


def frame(pkt: object) -> bytes:
    return bytes(Ether(src="02:00:00:00:10:01", dst=GATEWAY_MAC) / pkt)  # type: ignore[operator]


def dns(t: float, client: str, name: str, answer: str, qid: int) -> list[Record]:
    query = (
        IP(src=client, dst=RESOLVER)
        / UDP(sport=40000 + qid, dport=53)
        / DNS(id=qid, rd=1, qd=DNSQR(qname=name))
    )
    reply = (
        IP(src=RESOLVER, dst=client)
        / UDP(sport=53, dport=40000 + qid)
        / DNS(id=qid, qr=1, ra=1, qd=DNSQR(qname=name), an=DNSRR(rrname=name, rdata=answer, ttl=60))
    )
    return [(t, frame(query)), (t + 0.01, frame(reply))]


def tls_flow(
    start: float,
    client: str,
    server: str,
    sni: str,
    sport: int,
    *,
    minutes: float,
    megabytes: float,
    segment: int = 60_000,
) -> list[Record]:
    """A TLS connection: handshake with SNI, then the server streams `megabytes` evenly."""
    hello = TLS(
        msg=[
            TLSClientHello(
                gmt_unix_time=int(start),
                random_bytes=bytes(28),
                sid=b"",
                ext=[TLS_Ext_ServerName(servernames=[ServerName(servername=sni.encode())])],
            )
        ]
    )
    c2s = IP(src=client, dst=server)
    s2c = IP(src=server, dst=client)
    seq_c, seq_s = 1000, 5000
    out: list[Record] = [
        (start, frame(c2s / TCP(sport=sport, dport=443, flags="S", seq=seq_c - 1))),
        (start + 0.02, frame(s2c / TCP(sport=443, dport=sport, flags="SA", seq=seq_s - 1, ack=seq_c))),
        (start + 0.03, frame(c2s / TCP(sport=sport, dport=443, flags="A", seq=seq_c, ack=seq_s))),
    ]
    ch = bytes(hello)
    out.append(
        (start + 0.04, frame(c2s / TCP(sport=sport, dport=443, flags="PA", seq=seq_c, ack=seq_s) / Raw(ch)))
    )
    seq_c += len(ch)
    total = int(megabytes * 1_000_000)
    count = max(1, total // segment)
    step = minutes * 60 / count
    for i in range(count):
        t = start + 0.1 + i * step
        body = Raw(b"\x17\x03\x03" + bytes(segment - 3))
        out.append((t, frame(s2c / TCP(sport=443, dport=sport, flags="PA", seq=seq_s, ack=seq_c) / body)))
        seq_s += segment
        if i % 8 == 0:
            out.append((t + 0.001, frame(c2s / TCP(sport=sport, dport=443, flags="A", seq=seq_c, ack=seq_s))))
    end = start + 0.2 + minutes * 60
    out += [
        (end, frame(c2s / TCP(sport=sport, dport=443, flags="FA", seq=seq_c, ack=seq_s))),
        (end + 0.01, frame(s2c / TCP(sport=443, dport=sport, flags="FA", seq=seq_s, ack=seq_c + 1))),
        (end + 0.02, frame(c2s / TCP(sport=sport, dport=443, flags="A", seq=seq_c + 1, ack=seq_s + 1))),
    ]
    return out


def records() -> list[Record]:
    r: list[Record] = []
    # Room 12: Netflix in P1 (08:50-09:50).
    r += dns(at("09:04", 58), "10.20.12.34", "www.netflix.com", "203.0.113.10", 1)
    r += tls_flow(
        at("09:05"), "10.20.12.34", "203.0.113.10", "www.netflix.com", 50001, minutes=1, megabytes=0.3
    )
    r += dns(at("09:05", 30), "10.20.12.34", "ipv4-c001-lhr001-ix.1.oca.nflxvideo.net", "203.0.113.20", 2)
    r += tls_flow(
        at("09:05", 31),
        "10.20.12.34",
        "203.0.113.20",
        "ipv4-c001-lhr001-ix.1.oca.nflxvideo.net",
        50002,
        minutes=20,
        megabytes=24,
    )
    r += dns(at("09:30"), "10.20.12.34", "www.bbc.co.uk", "203.0.113.90", 3)
    r += tls_flow(
        at("09:30", 1), "10.20.12.34", "203.0.113.90", "www.bbc.co.uk", 50003, minutes=2, megabytes=3
    )
    # Room 14: Sky Go (Sky Sports live) in P3 (11:10-12:10).
    sky = "linear012-gb-dash1-prd-ak.cdn.skycdp.com"
    r += dns(at("11:15"), "10.20.14.21", sky, "203.0.113.30", 4)
    r += tls_flow(at("11:15", 1), "10.20.14.21", "203.0.113.30", sky, 50004, minutes=18, megabytes=16)
    # Room 12: a speed test and a teaching video: not personal streaming.
    r += dns(at("09:10"), "10.20.12.40", "fast.com", "203.0.113.40", 5)
    r += tls_flow(at("09:10", 1), "10.20.12.40", "203.0.113.40", "fast.com", 50005, minutes=0.5, megabytes=8)
    r += dns(at("09:20"), "10.20.12.40", "www.youtube.com", "203.0.113.50", 6)
    r += tls_flow(
        at("09:20", 1), "10.20.12.40", "203.0.113.50", "www.youtube.com", 50006, minutes=10, megabytes=6
    )
    # Room 12: a Netflix look-up and a prefetch, too short to be viewing.
    r += dns(at("10:00"), "10.20.12.41", "www.netflix.com", "203.0.113.10", 7)
    r += tls_flow(
        at("10:00", 1), "10.20.12.41", "203.0.113.10", "www.netflix.com", 50007, minutes=0.2, megabytes=0.02
    )
    # Staff room at lunch, and Room 14 after school: not in a lesson or not a classroom.
    r += tls_flow(
        at("12:30"),
        "10.20.1.5",
        "203.0.113.20",
        "ipv4-c001-lhr001-ix.1.oca.nflxvideo.net",
        50008,
        minutes=25,
        megabytes=20,
    )
    r += tls_flow(
        at("16:00"),
        "10.20.14.30",
        "203.0.113.20",
        "ipv4-c001-lhr001-ix.1.oca.nflxvideo.net",
        50009,
        minutes=30,
        megabytes=20,
    )
    r.sort(key=lambda rec: rec[0])
    return r


def write_pcap(path: Path, recs: list[Record]) -> None:
    with path.open("wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, 1))
        for t, data in recs:
            sec = int(t)
            usec = round((t - sec) * 1_000_000)
            kept = data[:SNAPLEN]
            fh.write(struct.pack("<IIII", sec, usec, len(kept), len(data)))
            fh.write(kept)


def main() -> int:
    out = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).resolve().parent / "captures" / "sample.pcap"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    recs = records()
    write_pcap(out, recs)
    print(f"{out}: {len(recs)} packets, {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
