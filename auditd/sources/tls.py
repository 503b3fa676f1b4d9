"""The server name in a TLS ClientHello, read from raw bytes without a TLS library.

Pure functions over bytes: they never raise on malformed input. Each answers with the name, with
`""` when the bytes can hold no name (not a ClientHello, no SNI extension), or with `None` when
more bytes are needed. A ClientHello cut short (a small snap length, a lost segment) still gives
its name when the SNI extension lies inside the bytes that are there.
"""

from __future__ import annotations

import re

_HOSTNAME = re.compile(rb"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})")
NEED_MORE = None


def clean_hostname(raw: bytes) -> str:
    """A plausible DNS name from wire bytes, lower-cased without the trailing dot, else ``""``."""
    raw = raw.rstrip(b".")
    if not raw or len(raw) > 253 or not _HOSTNAME.fullmatch(raw):
        return ""
    return raw.decode("ascii").lower()


def sni_from_handshake(hs: bytes) -> str | None:
    """The SNI of a handshake stream that starts with a ClientHello message (type 1).

    The message may be incomplete: parsing goes as far as the bytes allow.
    """
    n = len(hs)
    if n < 1:
        return NEED_MORE
    if hs[0] != 1:
        return ""
    if n < 4:
        return NEED_MORE
    declared = 4 + int.from_bytes(hs[1:4], "big")
    end = min(n, declared)
    short = "" if n >= declared else NEED_MORE
    p = 4 + 34  # version (2) + random (32)
    if p + 1 > end:
        return short
    p += 1 + hs[p]  # session id
    if p + 2 > end:
        return short
    p += 2 + int.from_bytes(hs[p : p + 2], "big")  # cipher suites
    if p + 1 > end:
        return short
    p += 1 + hs[p]  # compression methods
    if p + 2 > end:
        return short
    ext_end = min(end, p + 2 + int.from_bytes(hs[p : p + 2], "big"))
    p += 2
    while p + 4 <= ext_end:
        etype = int.from_bytes(hs[p : p + 2], "big")
        elen = int.from_bytes(hs[p + 2 : p + 4], "big")
        p += 4
        if etype == 0:
            # server_name_list: length (2), then entries of type (1), length (2), name
            q = p + 2
            stop = min(p + elen, ext_end)
            while q + 3 <= stop:
                ntype = hs[q]
                nlen = int.from_bytes(hs[q + 1 : q + 3], "big")
                q += 3
                if q + nlen > end:
                    return short
                if ntype == 0:
                    return clean_hostname(hs[q : q + nlen])
                q += nlen
            return short if p + elen > end else ""
        p += elen
    return short


def sni_from_records(stream: bytes) -> str | None:
    """The SNI from a client's first bytes on a TLS connection (records of type 22, handshake).

    The ClientHello may span several records and several TCP segments; `stream` is the
    reassembled byte stream from its start.
    """
    hs = bytearray()
    p = 0
    n = len(stream)
    while p < n:
        if stream[p] != 0x16:
            break
        if p + 5 > n:
            break
        if stream[p + 1] != 3:
            return ""
        rlen = int.from_bytes(stream[p + 3 : p + 5], "big")
        hs += stream[p + 5 : p + 5 + rlen]
        p += 5 + rlen
        if len(hs) >= 4 and len(hs) >= 4 + int.from_bytes(hs[1:4], "big"):
            break
    if not hs:
        return NEED_MORE if n < 5 and (n == 0 or stream[0] == 0x16) else ""
    return sni_from_handshake(bytes(hs))
