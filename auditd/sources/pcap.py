"""Names and flow totals from packet captures (pcap and pcapng), streamed.

Why not dissect every packet with scapy: at about 3,000 packets a second it would take minutes on a
single lesson's capture. Here records are read in chunks and link, IP, TCP and UDP headers are read
at offsets into the chunk, so a bulk video packet costs a header parse and a dict update. The module
is written to be compiled by mypyc (see `_COMPILED`) and still run well as plain Python. Payloads
are looked at only in a flow's first packets (until a name is found or a small budget is spent) and
in DNS packets. Names come from DNS queries and answers, the TLS ClientHello SNI (reassembled across
TCP segments), the HTTP Host header and the QUIC Initial SNI (decrypted, see `auditd.sources.quic`).

One observation is emitted per name per flow, when the flow ends (FIN or RST, idle for
`IDLE_SECONDS` of capture time, evicted from a full table, or end of file), with the flow's bytes on
the wire (original lengths, so a small snap length does not shrink them) and its span. DNS names are
emitted at once. A flow that carried at least `NAMELESS_MIN_PAYLOAD` bytes of payload but showed no
name is emitted with ``via="ip"`` and an empty host, for matching against published address ranges.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FunctionType
from typing import BinaryIO, Final

from auditd.errors import InputError
from auditd.model import NetObservation
from auditd.sources.quic import QuicState, feed_datagram, gquic_sni, is_gquic
from auditd.sources.tls import clean_hostname, sni_from_records

IDLE_SECONDS: Final = 120.0
MAX_FLOWS: Final = 200_000
NAMELESS_MIN_PAYLOAD: Final = 1024
CHUNK: Final = 1 << 16  # small enough that malloc reuses the memory: 1 MiB reads faulted in new pages
TCP_BUDGET: Final = 16 * 1024  # client bytes kept per direction while looking for a name
TCP_SEGMENTS: Final = 12
UDP_DATAGRAMS: Final = 12
MAX_RECORD: Final = 1 << 24  # a record claiming more than this is garbage, not a packet

PCAP_MAGICS: Final = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
PCAPNG_SHB: Final = b"\x0a\x0d\x0d\x0a"

# Link types (https://www.tcpdump.org/linktypes.html) mapped to how to find the IP header.
ETHERNET: Final = 1
NULL: Final = 0
LOOP: Final = 108
SLL: Final = 113
SLL2: Final = 276
RAW: Final = frozenset({101, 12, 14})
IPV4_ONLY: Final = 228
IPV6_ONLY: Final = 229

HTTP_METHODS: Final = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"OPTIONS ", b"DELETE ", b"PATCH ", b"CONNECT ")

_U32LE: Final = struct.Struct("<I")
_U32BE: Final = struct.Struct(">I")
_IP4: Final = struct.Struct(">BxHxxHxB")  # version/ihl, total length, flags/fragment, protocol
_H: Final = struct.Struct(">H")


@dataclass
class CaptureStats:
    packets: int = 0
    skipped: int = 0  # packets that could not be parsed (unknown link type, bad header, IP fragment)
    truncated: bool = False  # the file ends mid-record
    first_skipped: str | None = None  # e.g. "packet 1234: bad IPv4 header"
    fragments: int = 0
    flows: int = 0
    names: int = 0
    nameless: int = 0

    def skip(self, number: int, why: str) -> None:
        self.skipped += 1
        if self.first_skipped is None:
            self.first_skipped = f"packet {number}: {why}"


def is_capture(path: Path) -> bool:
    """Whether a file starts like a pcap (either byte order, usec or nsec) or a pcapng section."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head in PCAP_MAGICS or head == PCAPNG_SHB


# Whether this module runs compiled by mypyc (the Makefile builds it so; plain Python is the fallback):
# compiled functions are not Python function objects. The record loop reads headers the way that is
# fastest for each: compiled, byte by byte, which makes no objects at all; interpreted, with one
# `struct` call, which beats sixteen indexings.
_COMPILED: Final = not isinstance(is_capture, FunctionType)


# ---- flows ------------------------------------------------------------------------------------


class _Direction:
    """The first bytes one side sent, while the flow is still being looked into."""

    __slots__ = ("base", "count", "done", "held", "segs")

    def __init__(self) -> None:
        self.base: int | None = None
        self.segs: dict[int, bytes] = {}
        self.held = 0
        self.count = 0
        self.done = False

    def add(self, seq: int, data: bytes) -> None:
        self.count += 1
        if self.base is None:
            self.base = seq
        elif (seq - self.base) & 0xFFFFFFFF > 0x7FFFFFFF:
            self.base = seq  # an earlier segment arrived late: the stream starts here instead
        if len(data) > len(self.segs.get(seq, b"")):
            self.segs[seq] = data
            self.held += len(data)

    def stream(self) -> bytes:
        if self.base is None:
            return b""
        base = self.base
        if len(self.segs) == 1 and base in self.segs:
            return self.segs[base]  # the common case: the first segment holds all there is
        out = bytearray()
        for seq, data in sorted(self.segs.items(), key=lambda kv: (kv[0] - base) & 0xFFFFFFFF):
            rel = (seq - base) & 0xFFFFFFFF
            if rel > len(out):
                break
            if rel + len(data) > len(out):
                out += data[len(out) - rel :]
        return bytes(out)


class _Flow:
    __slots__ = (
        "a",
        "b",
        "client_is_a",
        "dns",
        "down",
        "fin",
        "first",
        "inspect",
        "key",
        "last",
        "names",
        "packets",
        "payload",
        "proto",
        "quic",
        "rkey",
        "up",
    )

    def __init__(self, key: bytes, rkey: bytes, proto: int, ts: float) -> None:
        self.key = key  # the first packet's direction: side "a" sent it
        self.rkey = rkey
        self.proto = proto
        self.first = ts
        self.last = ts
        self.up = 0  # bytes a -> b
        self.down = 0
        self.payload = 0
        self.fin = 0  # bit 1: a sent FIN, bit 2: b sent FIN
        self.names: list[tuple[float, str, str, bool]] = []  # ts, host, via, sent by a
        self.inspect = True
        self.a: _Direction | None = None
        self.b: _Direction | None = None
        self.quic: QuicState | None = None
        self.client_is_a: bool | None = None
        self.dns = False
        self.packets = 0


def _addr_port(key: bytes, server: bool) -> tuple[str, int]:
    n = 4 if len(key) == 12 else 16
    import socket  # here: a log's inspect imports this module (`is_capture`) and never needs it

    fam = socket.AF_INET if n == 4 else socket.AF_INET6
    if server:
        return socket.inet_ntop(fam, key[n : 2 * n]), int.from_bytes(key[2 * n + 2 : 2 * n + 4], "big")
    return socket.inet_ntop(fam, key[:n]), int.from_bytes(key[2 * n : 2 * n + 2], "big")


def _reverse(key: bytes) -> bytes:
    n = 4 if len(key) == 12 else 16
    return key[n : 2 * n] + key[:n] + key[2 * n + 2 : 2 * n + 4] + key[2 * n : 2 * n + 2]


def _utc(ts: float) -> datetime:
    try:
        return datetime.fromtimestamp(ts, UTC)
    except (OverflowError, OSError, ValueError):
        return datetime.fromtimestamp(0, UTC)


class _Engine:
    """The flow table and the per-packet work; observations collect in `out` for the reader to yield."""

    def __init__(self, source: str, stats: CaptureStats, max_flows: int) -> None:
        self.source = source
        self.stats = stats
        self.max_flows = max_flows
        self.tcp: dict[bytes, _Flow] = {}
        self.udp: dict[bytes, _Flow] = {}
        self.out: list[NetObservation] = []
        self.next_sweep = 0.0
        self.count = 0

    # -- per packet -----------------------------------------------------------------------------

    def packet(self, link: int, ts: float, wire: int, buf: bytes, o: int, end: int) -> None:
        """One captured frame `buf[o:end]` of link type `link`, `wire` bytes long on the wire."""
        stats = self.stats
        stats.packets += 1
        if ts >= self.next_sweep:
            if self.next_sweep:
                self.sweep(ts)
            self.next_sweep = ts + 10.0
        if link == ETHERNET:
            if end - o < 14:
                return stats.skip(stats.packets, "short Ethernet header")
            etype = (buf[o + 12] << 8) | buf[o + 13]
            ip = o + 14
            while etype == 0x8100 or etype == 0x88A8 or etype == 0x9100:
                if end - ip < 4:
                    return stats.skip(stats.packets, "short VLAN tag")
                etype = (buf[ip + 2] << 8) | buf[ip + 3]
                ip += 4
            if etype == 0x0800:
                return self.ipv4(ts, wire, buf, ip, end)
            if etype == 0x86DD:
                return self.ipv6(ts, wire, buf, ip, end)
            return None
        if link in (SLL, SLL2):
            hl = 16 if link == SLL else 20
            if end - o < hl:
                return stats.skip(stats.packets, "short Linux cooked header")
            at = o + 14 if link == SLL else o
            etype = (buf[at] << 8) | buf[at + 1]
            ip = o + hl
            while etype == 0x8100 or etype == 0x88A8:
                if end - ip < 4:
                    return stats.skip(stats.packets, "short VLAN tag")
                etype = (buf[ip + 2] << 8) | buf[ip + 3]
                ip += 4
            if etype == 0x0800:
                return self.ipv4(ts, wire, buf, ip, end)
            if etype == 0x86DD:
                return self.ipv6(ts, wire, buf, ip, end)
            return None
        if link in RAW or link in (IPV4_ONLY, IPV6_ONLY):
            ip = o
        elif link in (NULL, LOOP):
            ip = o + 4
        else:
            return stats.skip(stats.packets, f"unknown link type {link}")
        if ip >= end:
            return stats.skip(stats.packets, "empty packet")
        version = buf[ip] >> 4
        if version == 4:
            return self.ipv4(ts, wire, buf, ip, end)
        if version == 6:
            return self.ipv6(ts, wire, buf, ip, end)
        return stats.skip(stats.packets, f"IP version {version}")

    def ipv4(self, ts: float, wire: int, buf: bytes, ip: int, end: int) -> None:
        if end - ip < 20:
            return self.stats.skip(self.stats.packets, "short IPv4 header")
        vihl, total, frag, proto = _IP4.unpack_from(buf, ip)
        ihl = (vihl & 0x0F) << 2
        if vihl >> 4 != 4 or ihl < 20 or total < ihl:
            return self.stats.skip(self.stats.packets, "bad IPv4 header")
        if frag & 0x3FFF:
            self.stats.fragments += 1
            return self.stats.skip(self.stats.packets, "IP fragment")
        l4 = ip + ihl
        if proto != 6 and proto != 17:
            return None
        if end - l4 < 8:
            return self.stats.skip(self.stats.packets, "short TCP/UDP header")
        key = buf[ip + 12 : ip + 24] if ihl == 20 else buf[ip + 12 : ip + 20] + buf[l4 : l4 + 4]
        stop = ip + total
        return self.l4(proto, key, ts, wire, buf, l4, stop if stop < end else end, stop - l4)

    def ipv6(self, ts: float, wire: int, buf: bytes, ip: int, end: int) -> None:
        if end - ip < 40:
            return self.stats.skip(self.stats.packets, "short IPv6 header")
        plen = (buf[ip + 4] << 8) | buf[ip + 5]
        nxt = buf[ip + 6]
        l4 = ip + 40
        stop = l4 + plen
        while nxt != 6 and nxt != 17:
            if nxt in (0, 43, 60, 51):
                if end - l4 < 8:
                    return self.stats.skip(self.stats.packets, "short IPv6 extension header")
                nxt, hlen = buf[l4], buf[l4 + 1]
                l4 += (hlen + 2) * 4 if nxt == 51 else (hlen + 1) * 8
            elif nxt == 44:
                self.stats.fragments += 1
                return self.stats.skip(self.stats.packets, "IP fragment")
            else:
                return None
        if end - l4 < 8:
            return self.stats.skip(self.stats.packets, "short TCP/UDP header")
        key = buf[ip + 8 : ip + 40] + buf[l4 : l4 + 4]
        return self.l4(nxt, key, ts, wire, buf, l4, stop if stop < end else end, stop - l4)

    def l4(
        self, proto: int, key: bytes, ts: float, wire: int, buf: bytes, l4: int, end: int, l4len: int
    ) -> None:
        """A TCP or UDP packet: `end` bounds the captured bytes, `l4len` is the length on the wire."""
        table = self.tcp if proto == 6 else self.udp
        f = table.get(key)
        if f is None:
            f = self.new_flow(table, key, proto, ts)
        if key == f.key:
            f.up += wire
            a = True
        else:
            f.down += wire
            a = False
        f.last = ts
        if proto == 6:
            hl = (buf[l4 + 12] >> 4) << 2
            flags = buf[l4 + 13]
            f.payload += l4len - hl
            if flags & 7:
                if flags & 2:
                    if not flags & 0x10:
                        f.client_is_a = a
                elif flags & 4:
                    return self.close(table, f)
                else:
                    f.fin |= 1 if a else 2
                    if f.fin == 3:
                        return self.close(table, f)
            if f.inspect and l4 + hl < end:
                self.inspect_tcp(f, a, ts, buf, l4, hl, end)
        else:
            f.payload += l4len - 8
            if f.inspect and l4 + 8 < end:
                self.inspect_udp(f, a, ts, bytes(buf[l4 + 8 : end]))
        return None

    def new_flow(self, table: dict[bytes, _Flow], key: bytes, proto: int, ts: float) -> _Flow:
        rkey = _reverse(key)
        f = _Flow(key, rkey, proto, ts)
        table[key] = f
        table[rkey] = f
        self.stats.flows += 1
        self.count += 1
        if self.count > self.max_flows:
            self.evict()
        return f

    def records(self, buf: bytes, link: int, unit: float, big: bool) -> int:
        """The whole pcap records in `buf`: where the first incomplete one starts, -1 after a bad header.

        A plain loop rather than part of the `_pcap` generator: compiled, a generator's locals live on
        the heap, a function's in registers.
        """
        native = _COMPILED
        unpack = (_RECORD_BE if big else _RECORD_LE).unpack_from
        stats = self.stats
        eth = link == ETHERNET
        tcp = self.tcp
        next_sweep = self.next_sweep
        fast = 0  # packets taken by the hot path, not yet added to stats.packets
        n = len(buf)
        off = 0
        while off + 16 <= n:
            if native:
                sec, frac, incl, orig = _record_header(buf, off, big)
            else:
                sec, frac, incl, orig = unpack(buf, off)
            if incl > MAX_RECORD:
                stats.packets += fast
                stats.skip(stats.packets + 1, f"bad record header (captured length {incl})")
                return -1
            start = off + 16
            end = start + incl
            if end > n:
                break
            off = end
            ts = sec + frac * unit
            wire = orig if orig > incl else incl
            # The hot path, inlined: a TCP segment without SYN/RST/FIN over Ethernet and a plain IPv4
            # header (20 bytes, not a fragment), in a known flow whose payload this side sends is
            # not (or no longer) looked into, between sweeps. Anything else goes to `packet`, which
            # does the same for this case.
            if (
                eth
                and incl >= 54
                and buf[start + 12] == 0x08  # EtherType 0x0800: IPv4
                and buf[start + 13] == 0x00
                and buf[start + 14] == 0x45  # version 4, 20-byte header
                and buf[start + 23] == 6
                and not buf[start + 47] & 7
                and not (buf[start + 20] & 0x3F or buf[start + 21])
                and ts < next_sweep
            ):
                key = buf[start + 26 : start + 38]
                f = tcp.get(key)
                total = (buf[start + 16] << 8) | buf[start + 17]
                if f is not None and total >= 20:
                    a = key == f.key
                    hl = (buf[start + 46] >> 4) << 2
                    if f.inspect:  # still looked into: fine only if this side is done, or sent nothing
                        d = f.a if a else f.b
                        stop = start + 14 + total
                        looked = d is not None and d.done
                        if not looked and start + 34 + hl < (stop if stop < end else end):
                            f = None
                    if f is not None:
                        fast += 1
                        if a:
                            f.up += wire
                        else:
                            f.down += wire
                        f.last = ts
                        f.payload += total - 20 - hl
                        continue
            stats.packets += fast
            fast = 0
            self.packet(link, ts, wire, buf, start, end)
            next_sweep = self.next_sweep
        stats.packets += fast
        return off

    # -- payloads -------------------------------------------------------------------------------

    def name(self, f: _Flow, ts: float, host: str, via: str, by_a: bool) -> None:
        if host and not any(h == host and v == via for _, h, v, _ in f.names):
            f.names.append((ts, host, via, by_a))
            if f.client_is_a is None:
                f.client_is_a = by_a

    def inspect_tcp(self, f: _Flow, a: bool, ts: float, buf: bytes, l4: int, hl: int, end: int) -> None:
        d = f.a if a else f.b
        if d is None:
            d = _Direction()
            if a:
                f.a = d
            else:
                f.b = d
        if d.done:
            return
        seq = _U32BE.unpack_from(buf, l4 + 4)[0]
        d.add(seq, bytes(buf[l4 + hl : end]))
        data = d.stream()
        result = self.tcp_name(f, a, ts, data)
        if result is not None or d.held > TCP_BUDGET or d.count > TCP_SEGMENTS:
            d.done = True
            d.segs = {}
            other = f.b if a else f.a
            if result or (other is not None and other.done):
                f.inspect = False
                f.a = f.b = None

    def tcp_name(self, f: _Flow, a: bool, ts: float, data: bytes) -> str | None:
        """A name from one side's first bytes: the name, ``""`` for none, None to wait for more."""
        if not data:
            return None
        n = len(key := f.key) // 3
        ports = key[-4:]
        port53 = ports[0:2] == b"\x00\x35" or ports[2:4] == b"\x00\x35"
        del n
        if port53:
            return self.tcp_dns(f, a, ts, data)
        first = data[0]
        if first == 0x16:
            sni = sni_from_records(data)
            if sni:
                self.name(f, ts, sni, "tls-sni", a)
            return sni
        if first in b"GPHODC" and data.startswith(HTTP_METHODS):
            head_end = data.find(b"\r\n\r\n")
            head = data if head_end < 0 else data[:head_end]
            host = http_host(head)
            if host is None and head_end < 0:
                return None
            host = host or ""
            if host:
                self.name(f, ts, host, "http-host", a)
            return host
        return ""

    def tcp_dns(self, f: _Flow, a: bool, ts: float, data: bytes) -> str | None:
        f.dns = True
        if len(data) < 2:
            return None
        size = (data[0] << 8) | data[1]
        if len(data) < 2 + size:
            return None
        self.dns(f, a, ts, data[2 : 2 + size])
        return ""

    def inspect_udp(self, f: _Flow, a: bool, ts: float, data: bytes) -> None:
        key = f.key
        ports = key[-4:]
        if ports[0:2] == b"\x00\x35" or ports[2:4] == b"\x00\x35":
            f.dns = True
            self.dns(f, a, ts, data)
            return
        f.packets += 1
        if f.packets > UDP_DATAGRAMS:
            f.inspect = False
            f.quic = None
            return
        if data[0] & 0x80:
            if f.quic is None:
                f.quic = QuicState()
            q = f.quic
            if feed_datagram(q, data) and q.done:
                if q.sni:
                    self.name(f, ts, q.sni, "quic-sni", a)
                f.inspect = False
                f.quic = None
        elif is_gquic(data) or b"CHLO" in data:
            sni = gquic_sni(data)
            if sni:
                self.name(f, ts, sni, "quic-sni", a)
                f.inspect = False

    def dns(self, f: _Flow, a: bool, ts: float, msg: bytes) -> None:
        parsed = parse_dns(msg)
        if parsed is None:
            return
        response, names = parsed
        # the client is the side that asked: for a response, the receiver
        asker_is_a = (not a) if response else a
        ckey = f.key if asker_is_a else f.rkey
        client, _ = _addr_port(ckey, False)
        server, _ = _addr_port(ckey, True)
        for host in names:
            if any(h == host for _, h, _, _ in f.names):
                continue
            f.names.append((ts, host, "dns", asker_is_a))
            self.stats.names += 1
            self.out.append(NetObservation(self.source, _utc(ts), client, server, host, "dns"))

    # -- ending flows ---------------------------------------------------------------------------

    def close(self, table: dict[bytes, _Flow], f: _Flow) -> None:
        table.pop(f.key, None)
        table.pop(f.rkey, None)
        self.count -= 1
        self.emit(f)

    def emit(self, f: _Flow) -> None:
        if f.dns:
            return
        total = f.up + f.down
        first, last = _utc(f.first), _utc(f.last)
        ap, bp = _addr_port(f.key, False), _addr_port(f.key, True)
        proto = "tcp" if f.proto == 6 else "udp"
        if f.names:
            for ts, host, via, by_a in f.names:
                client, server = (ap, bp) if by_a else (bp, ap)
                fid = f"{proto} {client[0]}:{client[1]} {server[0]}:{server[1]} {f.first:.6f}"
                self.stats.names += 1
                self.out.append(
                    NetObservation(
                        self.source, _utc(ts), client[0], server[0], host, via, total, first, last, fid
                    )
                )
        elif f.payload >= NAMELESS_MIN_PAYLOAD:
            if f.client_is_a is not None:
                client_is_a = f.client_is_a
            else:  # picked up mid-flow: the well-known (lower) port is the server's
                client_is_a = ap[1] > bp[1] or (ap[1] == bp[1] and f.up < f.down)
            client, server = (ap, bp) if client_is_a else (bp, ap)
            fid = f"{proto} {client[0]}:{client[1]} {server[0]}:{server[1]} {f.first:.6f}"
            self.stats.nameless += 1
            self.out.append(
                NetObservation(self.source, first, client[0], server[0], "", "ip", total, first, last, fid)
            )

    def _unique(self) -> list[tuple[dict[bytes, _Flow], _Flow]]:
        return [(t, f) for t in (self.tcp, self.udp) for k, f in t.items() if k is f.key]

    def sweep(self, now: float) -> None:
        """End flows idle for longer than IDLE_SECONDS of capture time."""
        limit = now - IDLE_SECONDS
        for table, f in self._unique():
            if f.last < limit:
                self.close(table, f)

    def evict(self) -> None:
        """The table is full: end the eighth of flows that have been idle longest."""
        flows = sorted(self._unique(), key=lambda tf: tf[1].last)
        for table, f in flows[: max(1, len(flows) // 8)]:
            self.close(table, f)

    def finish(self) -> None:
        for table, f in self._unique():
            self.close(table, f)


def http_host(head: bytes) -> str | None:
    """The Host header of an HTTP request head, without port; ``""`` for an address literal."""
    for line in head.split(b"\r\n")[1:]:
        if line[:5].lower() == b"host:":
            value = line[5:].strip()
            if value.startswith(b"["):
                return ""
            host = value.rsplit(b":", 1)[0] if value.count(b":") == 1 else value
            name = clean_hostname(host)
            if not name or name.replace(".", "").isdigit() or ":" in name:
                return ""
            return name
    return None


def _dns_name(msg: bytes, p: int) -> tuple[str, int]:
    """A possibly compressed name at `p`: (name, position after it); raises IndexError/ValueError."""
    labels: list[bytes] = []
    after = -1
    jumps = 0
    while True:
        n = msg[p]
        if n == 0:
            p += 1
            break
        if n & 0xC0 == 0xC0:
            if after < 0:
                after = p + 2
            p = ((n & 0x3F) << 8) | msg[p + 1]
            jumps += 1
            if jumps > 32:
                raise ValueError("compression loop")
            continue
        if n & 0xC0:
            raise ValueError("bad label")
        if p + 1 + n > len(msg):
            raise IndexError("label runs past the end")
        labels.append(msg[p + 1 : p + 1 + n])
        p += 1 + n
        if len(labels) > 127:
            raise ValueError("too many labels")
    name = clean_hostname(b".".join(labels))
    return name, (after if after >= 0 else p)


def parse_dns(msg: bytes) -> tuple[bool, list[str]] | None:
    """(is a response, names): the query names, then any CNAME targets; None if not DNS."""
    if len(msg) < 12:
        return None
    flags = (msg[2] << 8) | msg[3]
    qd, an = (msg[4] << 8) | msg[5], (msg[6] << 8) | msg[7]
    if qd > 16 or (flags >> 11) & 0xF not in (0, 1, 2):
        return None
    names: list[str] = []
    p = 12
    try:
        for _ in range(qd):
            name, p = _dns_name(msg, p)
            p += 4
            if name and name not in names:
                names.append(name)
        response = bool(flags & 0x8000)
        if response:
            for _ in range(min(an, 64)):
                _, p = _dns_name(msg, p)
                rtype = (msg[p] << 8) | msg[p + 1]
                rdlen = (msg[p + 8] << 8) | msg[p + 9]
                p += 10
                if rtype == 5:
                    target, _ = _dns_name(msg, p)
                    if target and target not in names:
                        names.append(target)
                p += rdlen
    except (IndexError, ValueError):
        if not names:
            return None
        response = bool(flags & 0x8000)
    return response, names


# ---- records ----------------------------------------------------------------------------------


def read_capture(
    path: Path, *, source: str, stats: CaptureStats, max_flows: int = MAX_FLOWS
) -> Iterator[NetObservation]:
    """The names seen in a pcap or pcapng file, streamed; bad packets are counted in `stats`."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", where=str(path)) from None
    with fh:
        head = fh.read(4)
        engine = _Engine(source, stats, max_flows)
        if head in PCAP_MAGICS:
            records = _pcap(fh, head, stats, engine)
        elif head == PCAPNG_SHB:
            records = _pcapng(fh, head, stats, engine)
        else:
            raise InputError("not a pcap or pcapng capture (unknown magic bytes)", where=str(path))
        out = engine.out
        for _ in records:
            if out:
                yield from out
                out.clear()
        engine.finish()
        yield from out
        out.clear()


def _pcap(fh: BinaryIO, magic: bytes, stats: CaptureStats, engine: _Engine) -> Iterator[None]:
    """Classic pcap records; yields after each chunk so the caller can pass on what was emitted."""
    endian, unit = PCAP_MAGICS[magic]
    header = fh.read(20)
    if len(header) < 20:
        stats.truncated = True
        return
    link = struct.unpack(endian + "I", header[16:20])[0] & 0x03FFFFFF
    buf = b""
    off = 0
    while data := fh.read(max(CHUNK, len(buf) - off)):  # a record longer than CHUNK: double up
        buf = buf[off:] + data if off < len(buf) else data
        off = engine.records(buf, link, unit, endian == ">")
        if off < 0:
            stats.truncated = True
            return
        yield None
    if off < len(buf):
        stats.truncated = True


_RECORD_LE: Final = struct.Struct("<IIII")  # seconds, fraction, captured length, length on the wire
_RECORD_BE: Final = struct.Struct(">IIII")


def _record_header(buf: bytes, p: int, big: bool) -> tuple[int, int, int, int]:
    """The four fields of the pcap record header at `p`, read byte by byte: see `_COMPILED`."""
    if big:
        return (
            buf[p] << 24 | buf[p + 1] << 16 | buf[p + 2] << 8 | buf[p + 3],
            buf[p + 4] << 24 | buf[p + 5] << 16 | buf[p + 6] << 8 | buf[p + 7],
            buf[p + 8] << 24 | buf[p + 9] << 16 | buf[p + 10] << 8 | buf[p + 11],
            buf[p + 12] << 24 | buf[p + 13] << 16 | buf[p + 14] << 8 | buf[p + 15],
        )
    return (
        buf[p] | buf[p + 1] << 8 | buf[p + 2] << 16 | buf[p + 3] << 24,
        buf[p + 4] | buf[p + 5] << 8 | buf[p + 6] << 16 | buf[p + 7] << 24,
        buf[p + 8] | buf[p + 9] << 8 | buf[p + 10] << 16 | buf[p + 11] << 24,
        buf[p + 12] | buf[p + 13] << 8 | buf[p + 14] << 16 | buf[p + 15] << 24,
    )


_SHB_LE: Final = b"\x4d\x3c\x2b\x1a"
_SHB_BE: Final = b"\x1a\x2b\x3c\x4d"


def _interface(body: bytes, endian: str) -> tuple[int, float, float, int]:
    """(link type, seconds per tick, offset in seconds, snap length) from an IDB's body."""
    link, _, snap = struct.unpack_from(endian + "HHI", body, 0)
    scale = 1e-6
    offset = 0.0
    p = 8
    while p + 4 <= len(body):
        code, size = struct.unpack_from(endian + "HH", body, p)
        value = body[p + 4 : p + 4 + size]
        if code == 0:
            break
        if code == 9 and size >= 1:
            r = value[0]
            scale = 2.0 ** -(r & 0x7F) if r & 0x80 else 10.0 ** -(r & 0x7F)
        elif code == 14 and size >= 8:
            offset = float(struct.unpack_from(endian + "q", value, 0)[0])
        p += 4 + ((size + 3) & ~3)
    return link, scale, offset, snap


def _pcapng(fh: BinaryIO, magic: bytes, stats: CaptureStats, engine: _Engine) -> Iterator[None]:
    """pcapng blocks of every section: IDB, EPB, SPB and the obsolete PB give packets; others are skipped."""
    packet = engine.packet
    endian = "<"
    ifaces: list[tuple[int, float, float, int]] = []
    u32 = _U32LE.unpack_from
    epb = struct.Struct("<IIIII").unpack_from
    pb = struct.Struct("<HHIIII").unpack_from
    last_ts = 0.0
    buf = magic
    off = 0
    while True:
        data = fh.read(max(CHUNK, len(buf) - off))  # a block longer than CHUNK: double up
        if data:
            buf = buf[off:] + data if off < len(buf) else data
            off = 0
        n = len(buf)
        while off + 12 <= n:
            btype = u32(buf, off)[0]
            if btype == 0x0A0D0D0A:
                bom = buf[off + 8 : off + 12]
                if bom == _SHB_LE:
                    endian = "<"
                elif bom == _SHB_BE:
                    endian = ">"
                else:
                    stats.skip(stats.packets + 1, "bad pcapng section header")
                    stats.truncated = True
                    return
                u32 = (_U32LE if endian == "<" else _U32BE).unpack_from
                epb = struct.Struct(endian + "IIIII").unpack_from
                pb = struct.Struct(endian + "HHIIII").unpack_from
                ifaces = []
            elif endian == ">":
                btype = _U32BE.unpack_from(buf, off)[0]
            blen = u32(buf, off + 4)[0]
            if blen < 12 or blen & 3 or blen > MAX_RECORD:
                stats.skip(stats.packets + 1, f"bad pcapng block (length {blen})")
                stats.truncated = True
                return
            bend = off + blen
            if bend > n:
                break
            try:
                if btype == 6:
                    iface, hi, lo, incl, orig = epb(buf, off + 8)
                    link, scale, shift, _ = ifaces[iface]
                    last_ts = ((hi << 32) | lo) * scale + shift
                    start = off + 28
                    end = min(start + incl, bend - 4)
                    packet(link, last_ts, max(orig, end - start), buf, start, end)
                elif btype == 3:
                    orig = u32(buf, off + 8)[0]
                    link, _, _, snap = ifaces[0]
                    start = off + 12
                    end = start + min(orig, bend - 4 - start, snap or orig)
                    packet(link, last_ts, orig, buf, start, end)
                elif btype == 2:
                    iface, _, hi, lo, incl, orig = pb(buf, off + 8)
                    link, scale, shift, _ = ifaces[iface]
                    last_ts = ((hi << 32) | lo) * scale + shift
                    start = off + 28
                    end = min(start + incl, bend - 4)
                    packet(link, last_ts, max(orig, end - start), buf, start, end)
                elif btype == 1:
                    ifaces.append(_interface(buf[off + 8 : bend - 4], endian))
            except (IndexError, struct.error):
                stats.packets += btype != 1
                stats.skip(stats.packets, f"bad pcapng block type {btype} (no such interface?)")
            off = bend
        yield None
        if not data:
            break
    if off < len(buf):
        stats.truncated = True
