"""The server name in a QUIC client's first packets.

IETF QUIC (v1, v2 and draft-29) protects its Initial packets with keys anyone can derive from the
client's Destination Connection ID (RFC 9001 section 5.2, RFC 9369 section 3.3), so the ClientHello
and its SNI can be read: remove header protection, decrypt with AES-128-GCM, collect the CRYPTO
frames (which clients split and reorder on purpose) and parse the ClientHello. Google QUIC (Q0xx)
carried its ClientHello (CHLO) in the clear, with the name under the tag ``SNI``.

Nothing here raises on malformed input: a packet that does not decrypt or parse is ignored.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from auditd.sources.tls import clean_hostname, sni_from_handshake

if TYPE_CHECKING:  # imported when the first Initial is decrypted: a log or a TCP-only capture never needs it
    from cryptography.hazmat.primitives.ciphers import Cipher, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

V1 = 0x00000001
V2 = 0x6B3343CF
DRAFT29 = 0xFF00001D

_SALT_V1 = bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")
_SALT_V2 = bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9")
_SALT_DRAFT29 = bytes.fromhex("afbfec289993d24c9e9786f19c6111e04390a899")
_SALT_DRAFT23 = bytes.fromhex("c3eef712c72ebb5a11a7d2432bb46365bef9f502")

CRYPTO_CAP = 64 * 1024  # bytes of CRYPTO stream kept per connection: a ClientHello is a few KB


def salt_for(version: int) -> bytes | None:
    """The Initial salt of a version this reader can decrypt, else None."""
    if version == V1:
        return _SALT_V1
    if version == V2:
        return _SALT_V2
    if DRAFT29 <= version <= 0xFF000020:  # draft-29 to draft-32 share a salt
        return _SALT_DRAFT29
    if 0xFF000017 <= version <= 0xFF00001C:
        return _SALT_DRAFT23
    return None


def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """HKDF-Expand-Label (RFC 8446 section 7.1) with an empty context; one block is enough here."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return hmac.new(secret, info + b"\x01", hashlib.sha256).digest()[:length]


@dataclass(frozen=True)
class InitialKeys:
    """The client's Initial packet protection for one connection."""

    version: int
    aead: AESGCM
    iv: bytes
    hp: Cipher[modes.ECB]

    @classmethod
    def derive(cls, version: int, dcid: bytes) -> InitialKeys | None:
        salt = salt_for(version)
        if salt is None:
            return None
        initial = hmac.new(salt, dcid, hashlib.sha256).digest()
        client = _expand_label(initial, b"client in", 32)
        prefix = b"quicv2 " if version == V2 else b"quic "
        key = _expand_label(client, prefix + b"key", 16)
        iv = _expand_label(client, prefix + b"iv", 12)
        hp = _expand_label(client, prefix + b"hp", 16)
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        # ECB is what RFC 9001 5.4.3 prescribes for the header-protection mask: one block, no secrecy at stake
        return cls(version, AESGCM(key), iv, Cipher(algorithms.AES(hp), modes.ECB()))  # noqa: S305

    def mask(self, sample: bytes) -> bytes:
        enc = self.hp.encryptor()
        return enc.update(sample) + enc.finalize()


def read_varint(buf: bytes, p: int) -> tuple[int, int]:
    """A QUIC variable-length integer at `p`: (value, next position); raises IndexError when short."""
    first = buf[p]
    size = 1 << (first >> 6)
    if p + size > len(buf):
        raise IndexError("varint runs past the end")
    value = first & 0x3F
    for i in range(1, size):
        value = (value << 8) | buf[p + i]
    return value, p + size


def is_initial(first: int, version: int) -> bool:
    kind = (first >> 4) & 3
    return kind == 1 if version == V2 else kind == 0


@dataclass
class LongHeader:
    """One long-header packet inside a UDP datagram (datagrams may coalesce several)."""

    first: int
    version: int
    dcid: bytes
    scid: bytes
    start: int  # offset of the packet in the datagram
    pn_offset: int  # offset of the (protected) packet number; 0 when not an Initial
    end: int  # offset just after the packet


def long_headers(dgram: bytes) -> list[LongHeader]:
    """The long-header packets a datagram holds, in order; stops at the first that does not parse."""
    out: list[LongHeader] = []
    p = 0
    n = len(dgram)
    try:
        while p + 7 <= n and dgram[p] & 0x80:
            first = dgram[p]
            version = int.from_bytes(dgram[p + 1 : p + 5], "big")
            if version == 0:
                break  # version negotiation
            q = p + 5
            dlen = dgram[q]
            dcid = dgram[q + 1 : q + 1 + dlen]
            q += 1 + dlen
            slen = dgram[q]
            scid = dgram[q + 1 : q + 1 + slen]
            q += 1 + slen
            if dlen > 20 or slen > 20 or q > n:
                break
            initial = is_initial(first, version)
            kind = (first >> 4) & 3
            retry = kind == (0 if version == V2 else 3)
            if retry:
                out.append(LongHeader(first, version, dcid, scid, p, 0, n))
                break
            if initial:
                tlen, q = read_varint(dgram, q)
                q += tlen
            length, q = read_varint(dgram, q)
            end = q + length
            if end > n:
                break
            out.append(LongHeader(first, version, dcid, scid, p, q if initial else 0, end))
            p = end
    except IndexError:
        pass
    return out


def decrypt_initial(dgram: bytes, h: LongHeader, keys: InitialKeys) -> bytes | None:
    """The plaintext frames of one Initial packet, or None when it does not authenticate."""
    pn = h.pn_offset
    sample = dgram[pn + 4 : pn + 20]
    if len(sample) < 16:
        return None
    mask = keys.mask(sample)
    first = dgram[h.start] ^ (mask[0] & 0x0F)
    pn_len = (first & 3) + 1
    header = bytearray(dgram[h.start : pn + pn_len])
    header[0] = first
    number = 0
    for i in range(pn_len):
        b = dgram[pn + i] ^ mask[1 + i]
        header[pn - h.start + i] = b
        number = (number << 8) | b
    nonce = (int.from_bytes(keys.iv, "big") ^ number).to_bytes(12, "big")
    from cryptography.exceptions import InvalidTag

    try:
        return keys.aead.decrypt(nonce, dgram[pn + pn_len : h.end], bytes(header))
    except (InvalidTag, ValueError, OverflowError):
        return None


def crypto_frames(plain: bytes) -> list[tuple[int, bytes]]:
    """The CRYPTO frames (offset, data) of decrypted Initial frames; other frames are skipped."""
    out: list[tuple[int, bytes]] = []
    p = 0
    n = len(plain)
    try:
        while p < n:
            ftype = plain[p]
            p += 1
            if ftype == 0x00 or ftype == 0x01:  # PADDING, PING
                continue
            if ftype in (0x02, 0x03):  # ACK
                _, p = read_varint(plain, p)
                _, p = read_varint(plain, p)
                count, p = read_varint(plain, p)
                _, p = read_varint(plain, p)
                for _ in range(min(count, 1 << 16)):
                    _, p = read_varint(plain, p)
                    _, p = read_varint(plain, p)
                if ftype == 0x03:
                    for _ in range(3):
                        _, p = read_varint(plain, p)
            elif ftype == 0x06:  # CRYPTO
                offset, p = read_varint(plain, p)
                length, p = read_varint(plain, p)
                if p + length > n:
                    break
                out.append((offset, plain[p : p + length]))
                p += length
            elif ftype in (0x1C, 0x1D):  # CONNECTION_CLOSE
                _, p = read_varint(plain, p)
                if ftype == 0x1C:
                    _, p = read_varint(plain, p)
                rlen, p = read_varint(plain, p)
                p += rlen
            else:
                break  # not allowed in an Initial: stop rather than guess
    except IndexError:
        pass
    return out


@dataclass
class QuicState:
    """What one connection's client Initials have given so far."""

    keys: InitialKeys | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)
    held: int = 0
    done: bool = False
    sni: str | None = None

    def stream(self) -> bytes:
        """The CRYPTO stream contiguous from offset 0, overlapping chunks allowed."""
        out = bytearray()
        for off in sorted(self.chunks):
            data = self.chunks[off]
            if off > len(out):
                break
            if off + len(data) > len(out):
                out += data[len(out) - off :]
        return bytes(out)


def feed_datagram(state: QuicState, dgram: bytes) -> bool:
    """Feed one client-to-server datagram; True when it held a decryptable Initial.

    Sets `state.sni` (possibly ``""``) and `state.done` once the ClientHello is parsed.
    """
    used = False
    for h in long_headers(dgram):
        if not h.pn_offset or state.done:
            continue
        keys = state.keys
        plain = decrypt_initial(dgram, h, keys) if keys is not None and keys.version == h.version else None
        if plain is None:
            fresh = InitialKeys.derive(h.version, h.dcid)
            if fresh is None:
                continue
            plain = decrypt_initial(dgram, h, fresh)
            if plain is None:
                continue
            state.keys = fresh
        used = True
        for off, data in crypto_frames(plain):
            if off < CRYPTO_CAP and state.held < CRYPTO_CAP:
                old = state.chunks.get(off)
                if old is None or len(old) < len(data):
                    state.chunks[off] = data
                    state.held += len(data)
        result = sni_from_handshake(state.stream())
        if result is not None:
            state.sni = result
            state.done = True
    return used


def gquic_sni(dgram: bytes) -> str | None:
    """The SNI tag of a Google QUIC (Q0xx) ClientHello sent in the clear, if the datagram has one."""
    i = dgram.find(b"CHLO")
    if i < 0 or i + 8 > len(dgram):
        return None
    ntags = int.from_bytes(dgram[i + 4 : i + 6], "little")
    table = i + 8
    values = table + 8 * ntags
    if ntags > 128 or values > len(dgram):
        return None
    prev = 0
    for k in range(ntags):
        tag = dgram[table + 8 * k : table + 8 * k + 4]
        end = int.from_bytes(dgram[table + 8 * k + 4 : table + 8 * k + 8], "little")
        if tag == b"SNI\x00":
            if end < prev or values + end > len(dgram):
                return None
            return clean_hostname(dgram[values + prev : values + end]) or None
        prev = end
    return None


def is_gquic(dgram: bytes) -> bool:
    """A gQUIC client packet with the version flag: flags, 8-byte connection id, then `Q0xx`."""
    if len(dgram) < 13 or dgram[0] & 0x80:
        return False
    flags = dgram[0]
    p = 9 if flags & 0x08 else 1
    return bool(flags & 0x01) and dgram[p : p + 1] == b"Q" and dgram[p + 1 : p + 4].isdigit()
