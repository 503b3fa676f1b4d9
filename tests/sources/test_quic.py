"""QUIC Initial SNI: key derivation against the RFCs' sample values, and Initials encrypted here.

The encryptor below follows RFC 9001 section 5 and Appendix A step by step with the
`cryptography` package's own HKDF, so it shares no code with the reader it checks.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP

from auditd.sources.quic import V1, V2, InitialKeys, QuicState, feed_datagram, gquic_sni, long_headers
from tests.sources.test_pcap import CLIENT, SERVER, client_hello, eth, read, write_pcap

DCID = bytes.fromhex("8394c8f03e515708")  # RFC 9001 A.1 and RFC 9369 A.1
SALTS = {
    V1: bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
    V2: bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
    0xFF00001D: bytes.fromhex("afbfec289993d24c9e9786f19c6111e04390a899"),
}


def _label(secret: bytes, label: bytes, length: int) -> bytes:
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


def client_keys(version: int, dcid: bytes) -> tuple[bytes, bytes, bytes]:
    import hashlib
    import hmac

    initial = hmac.new(SALTS[version], dcid, hashlib.sha256).digest()
    secret = _label(initial, b"client in", 32)
    pre = b"quicv2 " if version == V2 else b"quic "
    return _label(secret, pre + b"key", 16), _label(secret, pre + b"iv", 12), _label(secret, pre + b"hp", 16)


def varint(n: int) -> bytes:
    if n < 64:
        return bytes([n])
    if n < 16384:
        return (n | 0x4000).to_bytes(2, "big")
    return (n | 0x80000000).to_bytes(4, "big")


def crypto(offset: int, data: bytes) -> bytes:
    return b"\x06" + varint(offset) + varint(len(data)) + data


def initial(version: int, dcid: bytes, pn: int, frames: bytes, size: int = 1200) -> bytes:
    """A protected client Initial packet (RFC 9001 section 5.4), padded towards `size`."""
    key, iv, hp = client_keys(version, dcid)
    type_bits = 0x10 if version == V2 else 0x00
    first = 0xC0 | type_bits | 0x03  # 4-byte packet number
    head = bytes([first]) + version.to_bytes(4, "big") + bytes([len(dcid)]) + dcid + b"\x00" + b"\x00"
    pad = max(0, size - len(head) - 2 - 4 - len(frames) - 16)
    plain = frames + b"\x00" * pad
    length = 4 + len(plain) + 16
    header = head + (length | 0x4000).to_bytes(2, "big") + pn.to_bytes(4, "big")
    nonce = (int.from_bytes(iv, "big") ^ pn).to_bytes(12, "big")
    sealed = AESGCM(key).encrypt(nonce, plain, header)
    pn_at = len(header) - 4
    enc = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    mask = enc.update(sealed[:16]) + enc.finalize()
    out = bytearray(header + sealed)
    out[0] ^= mask[0] & 0x0F
    for i in range(4):
        out[pn_at + i] ^= mask[1 + i]
    return bytes(out)


class TestKeys:
    """Initial keys match the RFCs' sample values."""

    def test_v1_rfc9001_a1(self) -> None:
        keys = InitialKeys.derive(V1, DCID)
        assert keys is not None and keys.iv.hex() == "fa044b2f42a3fd3b46fb255c"
        assert client_keys(V1, DCID)[0].hex() == "1f369613dd76d5467730efcbe3b1a22d"
        assert client_keys(V1, DCID)[2].hex() == "9f50449e04a0e810283a1e9933adedd2"

    def test_v2_rfc9369_a1(self) -> None:
        keys = InitialKeys.derive(V2, DCID)
        assert keys is not None and keys.iv.hex() == "91f73e2351d8fa91660e909f"
        assert client_keys(V2, DCID)[0].hex() == "8b1a0bc121284290a29e0971b5cd045d"
        assert client_keys(V2, DCID)[2].hex() == "45b95e15235d6f45a6b19cbcb0294ba9"

    def test_unknown_version_has_no_keys(self) -> None:
        assert InitialKeys.derive(0x0A0A0A0A, DCID) is None


class TestInitials:
    """Encrypted Initials give the ClientHello's SNI, however the CRYPTO data is cut up."""

    @pytest.mark.parametrize("version", [V1, V2, 0xFF00001D])
    def test_single_initial(self, version: int) -> None:
        state = QuicState()
        assert feed_datagram(state, initial(version, DCID, 2, crypto(0, client_hello("www.netflix.com"))))
        assert state.done and state.sni == "www.netflix.com"

    def test_crypto_split_reordered_within_and_across_packets(self) -> None:
        hello = client_hello("rr1---sn-aigzrn7e.googlevideo.com", pad=1500)
        parts = [hello[i : i + 300] for i in range(0, len(hello), 300)]
        offsets = [300 * i for i in range(len(parts))]
        # second packet first, and inside each packet the frames are out of order, with PING and PADDING
        second = b"".join(crypto(o, p) for o, p in reversed(list(zip(offsets[3:], parts[3:], strict=True))))
        first = (
            b"\x01"
            + crypto(offsets[2], parts[2])
            + b"\x00\x00"
            + crypto(0, parts[0])
            + crypto(offsets[1], parts[1])
        )
        state = QuicState()
        feed_datagram(state, initial(V1, DCID, 1, second))
        assert not state.done
        feed_datagram(state, initial(V1, DCID, 0, first))
        assert state.sni == "rr1---sn-aigzrn7e.googlevideo.com"

    def test_coalesced_packets_in_one_datagram(self) -> None:
        hello = client_hello("www.disneyplus.com")
        a = initial(V2, DCID, 0, crypto(60, hello[60:]), size=400)
        b = initial(V2, DCID, 1, crypto(0, hello[:60]), size=300)
        assert len(long_headers(a + b)) == 2
        state = QuicState()
        assert feed_datagram(state, a + b) and state.sni == "www.disneyplus.com"

    def test_tampered_packet_is_ignored(self) -> None:
        pkt = bytearray(initial(V1, DCID, 0, crypto(0, client_hello("x.example"))))
        pkt[-1] ^= 1
        state = QuicState()
        assert not feed_datagram(state, bytes(pkt)) and state.sni is None

    def test_in_a_capture_with_flow_totals(self, tmp_path: Path) -> None:
        hello = client_hello("www.primevideo.com", pad=1300)
        d1 = initial(V1, DCID, 0, crypto(1000, hello[1000:]))
        d2 = initial(V1, DCID, 1, crypto(0, hello[:1000]))
        up = [IP(src=CLIENT, dst=SERVER) / UDP(sport=50000, dport=443) / d for d in (d1, d2)]
        down = [IP(src=SERVER, dst=CLIENT) / UDP(sport=443, dport=50000) / (b"\x40" + b"s" * 1300)] * 5
        frames = [eth(p) for p in up + down]
        obs, _ = read(write_pcap(tmp_path / "q.pcap", frames))
        (o,) = obs
        assert (o.via, o.host, o.client, o.server) == ("quic-sni", "www.primevideo.com", CLIENT, SERVER)
        assert o.bytes == sum(len(f) for f in frames)


class TestGoogleQuic:
    def test_chlo_sni_tag(self) -> None:
        values = b"yt3.ggpht.com" + b"Q035"
        tags = struct.pack("<4sI4sI", b"SNI\x00", 13, b"VER\x00", 17)
        chlo = b"CHLO" + struct.pack("<HH", 2, 0) + tags + values
        dgram = b"\x0d" + b"\x11" * 8 + b"Q035" + b"\x01" + b"\x00" * 12 + b"\x80\x01\x00\x00\x04\x00" + chlo
        assert gquic_sni(dgram) == "yt3.ggpht.com"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=1400))
def test_random_datagrams_never_raise(data: bytes) -> None:
    feed_datagram(QuicState(), data)
    feed_datagram(QuicState(), b"\xc0\x00\x00\x00\x01\x08" + DCID + b"\x00" + data)
    gquic_sni(data)
    gquic_sni(b"CHLO" + data)
