"""The capture reader: record formats, link types, names, flow totals and bad input.

Captures are built here: packets with scapy, records written with `struct` so that every link
type, byte order, timestamp resolution and pcapng block type can be covered. The public corpus
(nDPI's test captures, see /work/shared/corpus/pcap/README.md) checks the names against what
nDPI and tshark found in the same files.
"""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Packet, Raw

from auditd.errors import InputError
from auditd.model import NetObservation
from auditd.pipeline import classify
from auditd.policy import load_policy
from auditd.sources.pcap import CaptureStats, is_capture, parse_dns, read_capture
from auditd.sources.tls import sni_from_handshake, sni_from_records
from tests.conftest import corpus_path

T0 = 1_764_000_000.0  # 2025-11-24, any fixed moment will do
CLIENT, SERVER = "10.20.12.34", "203.0.113.10"


# ---- builders ---------------------------------------------------------------------------------


def client_hello(sni: str | None, pad: int = 0) -> bytes:
    """A minimal TLS 1.3-style ClientHello handshake message (type 1) naming `sni`."""
    exts = b""
    if sni is not None:
        name = sni.encode()
        entry = b"\x00" + len(name).to_bytes(2, "big") + name
        body = len(entry).to_bytes(2, "big") + entry
        exts += b"\x00\x00" + len(body).to_bytes(2, "big") + body
    exts += b"\x00\x2b\x00\x03\x02\x03\x04"  # supported_versions
    if pad:
        exts += b"\x00\x15" + pad.to_bytes(2, "big") + b"\x00" * pad
    hello = b"\x03\x03" + bytes(range(32)) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    hello += len(exts).to_bytes(2, "big") + exts
    return b"\x01" + len(hello).to_bytes(3, "big") + hello


def tls_record(hs: bytes) -> bytes:
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def tcp_conversation(
    payloads: list[tuple[bool, bytes]], sport: int = 51000, dport: int = 443, v6: bool = False
) -> list[Packet]:
    """A TCP connection as IP packets: handshake, payloads (True = client sends), FIN both ways."""
    ipc = (
        (lambda: IPv6(src="2001:db8::34", dst="2001:db8::10")) if v6 else (lambda: IP(src=CLIENT, dst=SERVER))
    )
    ips = (
        (lambda: IPv6(src="2001:db8::10", dst="2001:db8::34")) if v6 else (lambda: IP(src=SERVER, dst=CLIENT))
    )
    cseq, sseq = 1000, 5000
    pkts: list[Packet] = [
        ipc() / TCP(sport=sport, dport=dport, flags="S", seq=cseq),
        ips() / TCP(sport=dport, dport=sport, flags="SA", seq=sseq, ack=cseq + 1),
    ]
    cseq += 1
    sseq += 1
    for from_client, data in payloads:
        if from_client:
            pkts.append(ipc() / TCP(sport=sport, dport=dport, flags="PA", seq=cseq) / Raw(data))
            cseq += len(data)
        else:
            pkts.append(ips() / TCP(sport=dport, dport=sport, flags="PA", seq=sseq) / Raw(data))
            sseq += len(data)
    pkts.append(ipc() / TCP(sport=sport, dport=dport, flags="FA", seq=cseq))
    pkts.append(ips() / TCP(sport=dport, dport=sport, flags="FA", seq=sseq))
    return pkts


def write_pcap(
    path: Path,
    frames: list[bytes],
    *,
    link: int = 1,
    nsec: bool = False,
    endian: str = "<",
    snaplen: int = 65535,
    orig: list[int] | None = None,
    t0: float = T0,
    step: float = 0.01,
) -> Path:
    """A classic pcap file; frames longer than `snaplen` are cut, keeping their original length."""
    magic = 0xA1B23C4D if nsec else 0xA1B2C3D4
    out = bytearray(struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, snaplen, link))
    for i, frame in enumerate(frames):
        ts = t0 + i * step
        sec = int(ts)
        frac = round((ts - sec) * (1e9 if nsec else 1e6))
        kept = frame[:snaplen]
        length = orig[i] if orig else len(frame)
        out += struct.pack(endian + "IIII", sec, frac, len(kept), length) + kept
    path.write_bytes(bytes(out))
    return path


def ng_block(btype: int, body: bytes, endian: str = "<") -> bytes:
    body += b"\x00" * (-len(body) % 4)
    total = len(body) + 12
    return struct.pack(endian + "II", btype, total) + body + struct.pack(endian + "I", total)


def ng_shb(endian: str = "<") -> bytes:
    return ng_block(0x0A0D0D0A, struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1), endian)


def ng_idb(link: int, tsresol: int | None = None, endian: str = "<", snaplen: int = 0) -> bytes:
    body = struct.pack(endian + "HHI", link, 0, snaplen)
    if tsresol is not None:
        body += struct.pack(endian + "HH", 9, 1) + bytes([tsresol]) + b"\x00\x00\x00"
        body += struct.pack(endian + "HH", 0, 0)
    return ng_block(1, body, endian)


def ng_epb(iface: int, ticks: int, frame: bytes, endian: str = "<", orig: int | None = None) -> bytes:
    head = struct.pack(
        endian + "IIIII", iface, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), orig or len(frame)
    )
    return ng_block(6, head + frame, endian)


def eth(pkt: Packet) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / pkt)


def read(path: Path, **kw: int) -> tuple[list[NetObservation], CaptureStats]:
    stats = CaptureStats()
    return list(read_capture(path, source="test", stats=stats, **kw)), stats


def names(obs: list[NetObservation]) -> set[tuple[str, str]]:
    return {(o.via, o.host) for o in obs}


# ---- record formats ---------------------------------------------------------------------------


class TestFormats:
    """Every pcap and pcapng variant reads the same packets."""

    def frames(self) -> list[bytes]:
        return [eth(p) for p in tcp_conversation([(True, tls_record(client_hello("www.netflix.com")))])]

    @pytest.mark.parametrize("endian", ["<", ">"])
    @pytest.mark.parametrize("nsec", [False, True])
    def test_classic_pcap_both_byte_orders_and_resolutions(
        self, tmp_path: Path, endian: str, nsec: bool
    ) -> None:
        path = write_pcap(tmp_path / "c.pcap", self.frames(), nsec=nsec, endian=endian, t0=T0 + 0.123456)
        assert is_capture(path)
        obs, stats = read(path)
        assert names(obs) == {("tls-sni", "www.netflix.com")}
        assert stats.packets == 5 and stats.skipped == 0 and not stats.truncated
        (o,) = obs
        assert o.first_seen is not None and abs(o.first_seen.timestamp() - (T0 + 0.123456)) < 1e-6

    @pytest.mark.parametrize("endian", ["<", ">"])
    def test_pcapng_nanosecond_interfaces_and_every_block_type(self, tmp_path: Path, endian: str) -> None:
        frames = self.frames()
        ns = int(T0) * 10**9 + 123_456_789
        body = ng_shb(endian) + ng_idb(101, endian=endian) + ng_idb(1, tsresol=9, endian=endian)
        body += ng_block(4, struct.pack(endian + "HH", 0, 0), endian)  # NRB, empty
        for i, f in enumerate(frames[:3]):
            body += ng_epb(1, ns + i * 1000, f, endian)
        # obsolete Packet Block on interface 1 (nanoseconds), then ISB, then a second section
        pb = struct.pack(
            endian + "HHIIII",
            1,
            0,
            (ns + 5000) >> 32,
            (ns + 5000) & 0xFFFFFFFF,
            len(frames[3]),
            len(frames[3]),
        )
        body += ng_block(2, pb + frames[3], endian)
        body += ng_block(5, struct.pack(endian + "III", 1, 0, 0), endian)
        other = "<" if endian == ">" else ">"
        body += ng_shb(other) + ng_idb(1, endian=other, snaplen=65535)
        body += ng_block(3, struct.pack(other + "I", len(frames[4])) + frames[4], other)  # SPB
        path = tmp_path / "c.pcapng"
        path.write_bytes(body)
        assert is_capture(path)
        obs, stats = read(path)
        assert stats.packets == 5 and stats.skipped == 0
        (o,) = obs
        assert o.host == "www.netflix.com" and o.ts.timestamp() == pytest.approx(T0 + 0.123458789, abs=1e-6)
        assert o.bytes == sum(len(f) for f in frames)

    def test_pcapng_sll2_interface(self, tmp_path: Path) -> None:
        pkts = tcp_conversation([(True, tls_record(client_hello("www.skygo.co.uk")))])
        sll2 = [struct.pack(">HHIHBB8s", 0x0800, 0, 2, 1, 0, 6, b"\x02" * 8) + bytes(p) for p in pkts]
        path = tmp_path / "s.pcapng"
        path.write_bytes(
            ng_shb()
            + ng_idb(276, tsresol=6)
            + b"".join(ng_epb(0, int(T0 * 1e6) + i, f) for i, f in enumerate(sll2))
        )
        obs, _ = read(path)
        assert names(obs) == {("tls-sni", "www.skygo.co.uk")}


# ---- link types and IP --------------------------------------------------------------------------


def _link_frames(link: int, pkts: list[Packet]) -> list[bytes]:
    out = []
    for p in pkts:
        raw = bytes(p)
        v6 = raw[0] >> 4 == 6
        if link == 1:
            out.append(eth(p))
        elif link == 113:
            out.append(struct.pack(">HHH8sH", 0, 1, 6, b"\x02" * 8, 0x86DD if v6 else 0x0800) + raw)
        elif link == 276:
            out.append(struct.pack(">HHIHBB8s", 0x86DD if v6 else 0x0800, 0, 2, 1, 0, 6, b"\x02" * 8) + raw)
        elif link == 0:
            out.append(struct.pack("<I", 30 if v6 else 2) + raw)
        elif link == 108:
            out.append(struct.pack(">I", 30 if v6 else 2) + raw)
        else:
            out.append(raw)
    return out


class TestLinkTypes:
    """Every link type finds the IP header; unknown ones are counted, never fatal."""

    @pytest.mark.parametrize("link", [1, 113, 276, 101, 12, 14, 228, 0, 108])
    def test_ipv4_over_link_type(self, tmp_path: Path, link: int) -> None:
        pkts = tcp_conversation([(True, tls_record(client_hello("www.primevideo.com")))])
        obs, stats = read(write_pcap(tmp_path / "l.pcap", _link_frames(link, pkts), link=link))
        assert names(obs) == {("tls-sni", "www.primevideo.com")}
        assert (obs[0].client, obs[0].server) == (CLIENT, SERVER) and stats.skipped == 0

    @pytest.mark.parametrize("link", [1, 113, 276, 101, 229, 0])
    def test_ipv6_over_link_type(self, tmp_path: Path, link: int) -> None:
        pkts = tcp_conversation([(True, tls_record(client_hello("www.disneyplus.com")))], v6=True)
        obs, _ = read(write_pcap(tmp_path / "l.pcap", _link_frames(link, pkts), link=link))
        assert names(obs) == {("tls-sni", "www.disneyplus.com")}
        assert obs[0].client == "2001:db8::34"

    def test_ipv6_extension_headers_are_walked(self, tmp_path: Path) -> None:
        pkts = tcp_conversation([(True, tls_record(client_hello("www.itv.com")))], v6=True)
        with_ext = [
            IPv6(src=p[IPv6].src, dst=p[IPv6].dst) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / p[TCP]
            for p in pkts
        ]
        obs, _ = read(write_pcap(tmp_path / "x.pcap", [eth(p) for p in with_ext]))
        assert names(obs) == {("tls-sni", "www.itv.com")}

    @pytest.mark.parametrize("tags", [1, 2])
    def test_vlan_and_qinq(self, tmp_path: Path, tags: int) -> None:
        pkts = tcp_conversation([(True, tls_record(client_hello("www.channel4.com")))])
        frames = []
        for p in pkts:
            outer = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
            if tags == 2:
                outer.type = 0x88A8
                frames.append(bytes(outer / Dot1Q(vlan=100, type=0x8100) / Dot1Q(vlan=12) / p))
            else:
                frames.append(bytes(outer / Dot1Q(vlan=12) / p))
        obs, _ = read(write_pcap(tmp_path / "v.pcap", frames))
        assert names(obs) == {("tls-sni", "www.channel4.com")}

    def test_unknown_link_type_is_skipped_and_counted(self, tmp_path: Path) -> None:
        obs, stats = read(write_pcap(tmp_path / "u.pcap", [b"\x00" * 60] * 3, link=147))
        assert obs == [] and stats.skipped == 3 and stats.packets == 3
        assert stats.first_skipped == "packet 1: unknown link type 147"

    def test_ip_fragments_are_skipped_and_counted(self, tmp_path: Path) -> None:
        frag = IP(src=CLIENT, dst=SERVER, flags="MF", frag=0) / UDP(sport=5000, dport=53) / Raw(b"x" * 40)
        obs, stats = read(write_pcap(tmp_path / "f.pcap", [eth(frag)]))
        assert obs == []
        assert stats.fragments == 1 and stats.skipped == 1 and "fragment" in (stats.first_skipped or "")


# ---- names --------------------------------------------------------------------------------------


class TestNames:
    """DNS, TLS SNI and HTTP Host, with who asked and the flow's totals."""

    def test_client_hello_split_over_three_segments_out_of_order(self, tmp_path: Path) -> None:
        rec = tls_record(client_hello("ipv4-c001-lhr001-ix.1.oca.nflxvideo.net", pad=600))
        a, b, c = rec[:7], rec[7:300], rec[300:]
        pkts = tcp_conversation([(True, a), (True, b), (True, c), (False, b"\x16\x03\x03" + b"s" * 2000)])
        # deliver the third segment before the second
        pkts[3], pkts[4] = pkts[4], pkts[3]
        frames = [eth(p) for p in pkts]
        obs, _ = read(write_pcap(tmp_path / "split.pcap", frames))
        (o,) = obs
        assert (o.via, o.host, o.client, o.server) == (
            "tls-sni",
            "ipv4-c001-lhr001-ix.1.oca.nflxvideo.net",
            CLIENT,
            SERVER,
        )
        assert o.bytes == sum(len(f) for f in frames)
        assert o.flow and o.first_seen and o.last_seen and o.last_seen > o.first_seen

    def test_http_host_and_numeric_host_is_nameless(self, tmp_path: Path) -> None:
        named = tcp_conversation(
            [(True, b"GET /x HTTP/1.1\r\nUser-Agent: t\r\nHost: Art-1.nflximg.net:80\r\n\r\n")], dport=80
        )
        numeric = tcp_conversation(
            [
                (True, b"GET /range/0-99 HTTP/1.1\r\nHost: 23.246.11.141\r\n\r\n"),
                (False, b"HTTP/1.1 200 OK\r\n\r\n" + b"v" * 3000),
            ],
            sport=51001,
            dport=80,
        )
        for p in numeric:
            p[IP].src, p[IP].dst = (
                (p[IP].src, "23.246.11.141") if p[IP].src == CLIENT else ("23.246.11.141", p[IP].dst)
            )
        obs, _ = read(write_pcap(tmp_path / "h.pcap", [eth(p) for p in named + numeric]))
        assert names(obs) == {("http-host", "art-1.nflximg.net"), ("ip", "")}
        ip = next(o for o in obs if o.via == "ip")
        assert (ip.client, ip.server) == (CLIENT, "23.246.11.141") and ip.bytes and ip.bytes > 3000
        policy = load_policy(None)
        classified = list(classify(obs, policy.classifier()))
        ranged = [o for o in classified if o.via == "ip-range"]
        assert [(o.host, o.service) for o in ranged] == [("23.246.11.141", "Netflix")]

    def test_dns_query_and_answer_with_cname(self, tmp_path: Path) -> None:
        q = (
            IP(src=CLIENT, dst="10.20.0.53")
            / UDP(sport=40000, dport=53)
            / DNS(id=7, rd=1, qd=DNSQR(qname="www.netflix.com"))
        )
        r = (
            IP(src="10.20.0.53", dst=CLIENT)
            / UDP(sport=53, dport=40000)
            / DNS(
                id=7,
                qr=1,
                qd=DNSQR(qname="www.netflix.com"),
                an=DNSRR(rrname="www.netflix.com", type="CNAME", rdata="www.dradis.netflix.com")
                / DNSRR(rrname="www.dradis.netflix.com", type="A", rdata="54.74.73.31"),
            )
        )
        obs, _ = read(write_pcap(tmp_path / "d.pcap", [eth(q), eth(r)]))
        assert [(o.via, o.host, o.client, o.server, o.bytes) for o in obs] == [
            ("dns", "www.netflix.com", CLIENT, "10.20.0.53", None),
            ("dns", "www.dradis.netflix.com", CLIENT, "10.20.0.53", None),
        ]

    def test_dns_over_tcp(self, tmp_path: Path) -> None:
        msg = bytes(DNS(id=9, rd=1, qd=DNSQR(qname="www.bbc.co.uk")))
        pkts = tcp_conversation([(True, len(msg).to_bytes(2, "big") + msg)], dport=53)
        obs, _ = read(write_pcap(tmp_path / "t.pcap", [eth(p) for p in pkts]))
        assert names(obs) == {("dns", "www.bbc.co.uk")}

    def test_snaplen_cut_packets_count_original_lengths(self, tmp_path: Path) -> None:
        pkts = tcp_conversation(
            [(True, tls_record(client_hello("www.netflix.com")))] + [(False, b"v" * 1400)] * 20
        )
        frames = [eth(p) for p in pkts]
        obs, _ = read(write_pcap(tmp_path / "snap.pcap", frames, snaplen=160))
        (o,) = obs
        assert o.host == "www.netflix.com" and o.bytes == sum(len(f) for f in frames) > 28_000

    def test_idle_flow_is_ended_and_table_is_bounded(self, tmp_path: Path) -> None:
        frames = []
        for i in range(50):
            pkts = tcp_conversation([(True, tls_record(client_hello(f"h{i}.example.org")))], sport=40000 + i)
            frames += [eth(p) for p in pkts[:3]]  # no FIN: the flows end by idleness or eviction
        obs, stats = read(write_pcap(tmp_path / "many.pcap", frames, step=10.0), max_flows=8)
        assert sorted(o.host for o in obs) == sorted(f"h{i}.example.org" for i in range(50))
        assert stats.flows == 50

    def test_reused_five_tuple_after_fin_is_a_new_flow(self, tmp_path: Path) -> None:
        one = tcp_conversation([(True, tls_record(client_hello("a.example.org")))])
        two = tcp_conversation([(True, tls_record(client_hello("b.example.org")))])
        obs, _ = read(write_pcap(tmp_path / "r.pcap", [eth(p) for p in one + two]))
        assert [o.host for o in obs] == ["a.example.org", "b.example.org"]
        assert len({o.flow for o in obs}) == 2


# ---- bad input ----------------------------------------------------------------------------------


class TestBadInput:
    """Bad input is counted and reported; only a file that is no capture at all raises."""

    def test_not_a_capture(self, tmp_path: Path) -> None:
        path = tmp_path / "garbage.pcap"
        path.write_bytes(b"From: someone\r\n\r\nhello")
        assert not is_capture(path)
        with pytest.raises(InputError, match="not a pcap or pcapng"):
            read(path)

    def test_truncated_file_keeps_what_was_read(self, tmp_path: Path) -> None:
        pkts = tcp_conversation([(True, tls_record(client_hello("www.netflix.com")))])
        path = write_pcap(tmp_path / "t.pcap", [eth(p) for p in pkts])
        data = path.read_bytes()
        path.write_bytes(data[:-30])
        obs, stats = read(path)
        assert stats.truncated and stats.packets == 4
        assert names(obs) == {("tls-sni", "www.netflix.com")}

    def test_truncated_pcapng_and_header_only(self, tmp_path: Path) -> None:
        path = tmp_path / "t.pcapng"
        path.write_bytes(ng_shb() + ng_idb(1) + ng_epb(0, 1, b"\x00" * 100)[:-10])
        _, stats = read(path)
        assert stats.truncated
        path.write_bytes(b"\xd4\xc3\xb2\xa1\x02\x00")
        _, stats = read(path)
        assert stats.truncated

    def test_garbage_after_header_never_raises(self, tmp_path: Path) -> None:
        path = tmp_path / "g.pcap"
        path.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + bytes(range(256)) * 40)
        _, stats = read(path)
        assert stats.skipped >= 1 and stats.first_skipped

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=600))
    def test_parsers_never_raise(self, data: bytes) -> None:
        sni_from_records(data)
        sni_from_records(b"\x16\x03\x01" + data)
        sni_from_handshake(b"\x01" + data)
        parse_dns(data)

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(st.binary(min_size=0, max_size=200), max_size=6), st.sampled_from([1, 113, 276, 101, 0, 9])
    )
    def test_random_records_never_raise(
        self, tmp_path_factory: pytest.TempPathFactory, frames: list[bytes], link: int
    ) -> None:
        path = write_pcap(tmp_path_factory.mktemp("fz") / "f.pcap", frames, link=link)
        read(path)
        truncated_pcapng = ng_shb() + ng_idb(link) + b"".join(ng_epb(0, 1, f) for f in frames)
        path.write_bytes(truncated_pcapng[: len(truncated_pcapng) * 2 // 3])
        read(path)


# ---- the public corpus ----------------------------------------------------------------------------


class TestCorpus:
    """nDPI's test captures give the names their README (and nDPI's and tshark's output) list."""

    def test_netflix(self) -> None:
        obs, stats = read(corpus_path("pcap", "netflix.pcap"))
        found = names(obs)
        for sni in (
            "api-global.netflix.com",
            "ios.nccp.netflix.com",
            "ichnaea.netflix.com",
            "art-s.nflximg.net",
        ):
            assert ("tls-sni", sni) in found
        for host in ("art-1.nflximg.net", "art-2.nflximg.net", "tp.akam.nflximg.com", "appboot.netflix.com"):
            assert ("http-host", host) in found
        assert ("dns", "ios.nccp.netflix.com") in found and ("dns", "artwork.akam.nflximg.net") in found
        open_connect = [o for o in obs if o.via == "ip" and o.server.startswith("23.246.")]
        assert len(open_connect) == 18 and all(o.bytes and o.client == "192.168.1.7" for o in open_connect)
        assert stats.packets == 1793 and stats.skipped == 0

    def test_quic_frags_every_flow_has_its_sni(self) -> None:
        obs, _ = read(corpus_path("pcap", "quic_frags_ch_out_of_order_same_packet_craziness.pcapng"))
        quic = [o for o in obs if o.via == "quic-sni"]
        assert len(quic) == 113 and len({o.flow for o in quic}) == 113
        assert len({o.host for o in quic}) == 49
        assert {"www.youtube.com", "i.ytimg.com", "yt3.ggpht.com"} <= {o.host for o in quic}

    def test_sites_tls_and_quic_v1(self) -> None:
        obs, _ = read(corpus_path("pcap", "sites.pcapng"))
        found = names(obs)
        for host in ("plus.google.com", "hangouts.google.com", "classroom.google.com", "www.threads.net"):
            assert ("quic-sni", host) in found
        for host in (
            "prod-static.disney-plus.net",
            "www.primevideo.com",
            "hulu.com",
            "gql.twitch.tv",
            "f.vimeocdn.com",
        ):
            assert ("tls-sni", host) in found
        assert Counter(o.via for o in obs)["tls-sni"] + Counter(o.via for o in obs)["quic-sni"] == 59

    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            (
                "youtube_quic.pcap",
                {"yt3.ggpht.com", "googleads.g.doubleclick.net", "pagead2.googlesyndication.com"},
            ),
            (
                "quic.pcap",
                {
                    "www.youtube.com",
                    "s.ytimg.com",
                    "i.ytimg.com",
                    "yt3.ggpht.com",
                    "mail.google.com",
                    "www.google.com",
                    "fonts.gstatic.com",
                },
            ),
            ("youtubeupload.pcap", {"upload.youtube.com"}),
            (
                "dazn.pcapng",
                {"www.dazn.com", "user-profile.ar.indazn.com", "subscriptions-service.dazn-api.com"},
            ),
            ("tls_ech.pcapng", {"performance.radar.cloudflare.com"}),
            ("encrypted_sni.pcap", set()),
            ("spotify_tcp.pcap", set()),
        ],
    )
    def test_names(self, name: str, expected: set[str]) -> None:
        obs, stats = read(corpus_path("pcap", name))
        assert {o.host for o in obs if o.host} == expected
        assert stats.skipped == 0 and not stats.truncated

    def test_tls_appdata_twitch_is_matched_by_address(self) -> None:
        obs, _ = read(corpus_path("pcap", "tls-appdata.pcap"))
        nameless = [o for o in obs if o.via == "ip"]
        assert nameless and all(o.server == "52.223.198.7" and o.client == "192.168.2.100" for o in nameless)
        classified = list(classify(obs, load_policy(None).classifier()))
        assert classified and all(o.via == "ip-range" and o.service == "Twitch" for o in classified)
