"""Live capture: packets from an interface into rotated pcap files in a spool folder.

Capturing needs CAP_NET_RAW; reading and judging traffic needs no privilege at all. So the two
are separate processes: `choysez-auditd capture --source NAME` (the capture unit, with only
CAP_NET_RAW) writes `NAME-YYYYmmddTHHMMSSZ.pcap` files, each complete once renamed from
`.part`, and the daemon's scans read the completed files like any `pcap` source and delete
each once its findings and checkpoint are committed. Only the first `snaplen` bytes of a packet
are kept (headers, DNS, a TLS ClientHello, a QUIC Initial), with the full length recorded, so
a spool holds little and never the content of what was watched.

The kernel filters with the source's BPF expression (compiled by scapy through libpcap or
tcpdump), so the capture process sees only DNS, HTTP, TLS and QUIC packets.
"""

from __future__ import annotations

import logging
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from auditd.config import LiveNetSource
from auditd.errors import SourceError

LINKTYPE_ETHERNET = 1


def spool_dir(src: LiveNetSource, store_path: Path) -> Path:
    """Where a live source's capture files go: its `spool` key, else beside the store."""
    return Path(src.spool) if src.spool else store_path.parent / "spool" / src.name


def completed(spool: Path) -> list[Path]:
    """Capture files that are finished (a `.part` file is still being written)."""
    if not spool.is_dir():
        return []
    return sorted(p for p in spool.iterdir() if p.suffix == ".pcap" and p.is_file())


class _Writer:
    """Writes one rotation's pcap file under a `.part` name, renamed when complete."""

    def __init__(self, spool: Path, name: str, snaplen: int, clock: Callable[[], float]) -> None:
        self.spool, self.name, self.snaplen, self.clock = spool, name, snaplen, clock
        self.fh: BinaryIO | None = None
        self.path: Path | None = None
        self.opened = 0.0
        self.packets = 0

    def open(self) -> None:
        self.opened = self.clock()
        stamp = datetime.fromtimestamp(self.opened, UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        self.path = self.spool / f"{self.name}-{stamp}.pcap"
        fd = os.open(self.path.with_suffix(".pcap.part"), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        self.fh = os.fdopen(fd, "wb")
        self.fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, self.snaplen, LINKTYPE_ETHERNET))
        self.packets = 0

    def write(self, when: float, frame: bytes) -> None:
        if self.fh is None:
            self.open()
        assert self.fh is not None
        sec = int(when)
        kept = frame[: self.snaplen]
        self.fh.write(struct.pack("<IIII", sec, int((when - sec) * 1e6), len(kept), len(frame)))
        self.fh.write(kept)
        self.packets += 1

    def close(self) -> Path | None:
        """Finish the current file: flushed, synced and renamed so readers may take it."""
        if self.fh is None or self.path is None:
            return None
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.fh = None
        os.replace(self.path.with_suffix(".pcap.part"), self.path)
        return self.path


def capture(
    src: LiveNetSource,
    spool: Path,
    *,
    stop: threading.Event,
    duration: float | None = None,
    clock: Callable[[], float] = time.time,
    on_file: Callable[[Path, int], None] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Capture until `stop` is set (or for `duration` seconds); returns the packets written."""
    logging.getLogger("scapy").setLevel(logging.ERROR)  # scapy's guesses about link types are noise here
    from scapy.arch.linux import L2ListenSocket

    spool.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        sock: Any = L2ListenSocket(iface=src.interface, filter=src.bpf)
    except PermissionError:
        raise SourceError(f"{src.name}: capturing on {src.interface} needs CAP_NET_RAW") from None
    except OSError as exc:
        raise SourceError(f"{src.name}: cannot capture on {src.interface}: {exc.strerror or exc}") from None
    except Exception as exc:  # scapy reports a bad BPF expression in several ways
        raise SourceError(f"{src.name}: cannot capture on {src.interface}: {exc}") from None
    if on_ready is not None:
        on_ready()
    writer = _Writer(spool, src.name, src.snaplen, clock)
    total = 0
    started = clock()
    rotate = src.rotate_minutes * 60
    try:
        while not stop.is_set():
            if duration is not None and clock() - started >= duration:
                break
            if writer.fh is not None and clock() - writer.opened >= rotate:
                _finish(writer, on_file)
            ready, _, _ = select.select([sock], [], [], 0.2)
            if not ready:
                continue
            frame = _recv(sock)
            if frame is not None:
                writer.write(clock(), frame)
                total += 1
    finally:
        sock.close()
        _finish(writer, on_file)
    return total


def _finish(writer: _Writer, on_file: Callable[[Path, int], None] | None) -> None:
    packets = writer.packets
    done = writer.close()
    if done is not None and on_file is not None:
        on_file(done, packets)


def _recv(sock: Any) -> bytes | None:
    """One frame as the wire carried it, or None for a packet scapy could not return."""
    try:
        _cls, data, _ts = sock.recv_raw(65535)
    except OSError:
        return None
    return bytes(data) if data else None
