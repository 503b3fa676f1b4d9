"""Benchmark the IMAP source against a naive whole-message fetch, on a real Dovecot.

    .venv/bin/python bench/mail.py [--messages 10000] [--keep]

Starts a private Dovecot on 127.0.0.1 (tests/mail/dovecot.py, as the tests do), writes `--messages`
realistic messages straight into its Maildir (a third with a 50 KB to 500 KB attachment, some
forwarded, some HTML only; about half already read), lets Dovecot index the folder, then times, each
in a fresh process:

1. our full scan: `read_imap` over the folder from no checkpoint (Dovecot's cache still cold);
2. a naive reader: imapclient fetching every whole message with `BODY.PEEK[]` in batches of 200
   (PEEK, so the mailbox is not marked read; `RFC822` would cost the same bytes and set \\Seen);
3. our second scan from the checkpoints of (1), nothing having changed;
4. our full scan again, now that Dovecot's cache is warm.

Prints wall time, messages/s, peak RSS of each process, the bytes Dovecot says it sent, and the
ratios. Targets: full scan at least 3x faster than the naive fetch, no-change rescan under 1 s,
peak RSS under 200 MB. Also checks that no flag changed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import resource
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAFF = [
    ("Jane Smith", "jane.smith@choysez.org.uk", "jane.smith77@gmail.com"),
    ("Tom Baker", "tom.baker@choysez.org.uk", "tbaker.home@outlook.com"),
    ("Sam Okafor", "sam.okafor@choysez.org.uk", "sam.okafor@icloud.com"),
    ("Priya Patel", "priya.patel@choysez.org.uk", None),
]
OTHERS = [
    ("Mark Evans", "mark.evans@example.net"),
    ("Grace Lee", "grace.lee@example.com"),
    ("Bromley Council", "noreply@bromley.gov.uk"),
    ("Supplier", "orders@stationery.example.co.uk"),
]
SUBJECTS = [
    "Lily's homework",
    "Trip consent form",
    "Parents' evening slots",
    "Re: timetable change",
    "Minutes of the staff meeting",
    "Invoice 4471",
    "Weekend plans",
    "Safeguarding training reminder",
]
PARAGRAPHS = [
    "Just a quick note about this week's homework and the science museum trip on Friday.",
    "Could you send the consent form back with her tomorrow? Thanks for your help.",
    "The minutes from Tuesday's meeting are below; please let me know of any corrections.",
    "We have moved the Year 9 parents' evening to Thursday, 4pm to 7pm, in the main hall.",
    "Attached is the invoice for the autumn order. Payment terms are thirty days.",
    "Are you around on Saturday? We were thinking of a walk if the weather holds.",
]
ATTACHMENTS = [
    ("application", "pdf", "report.pdf"),
    ("image", "jpeg", "photo.jpg"),
    ("application", "zip", "a.zip"),
]


def _attachment(blob: bytes, rng: random.Random) -> bytes:
    """An attachment part, encoded once and reused: building 10,000 messages must not take minutes."""
    maintype, subtype, filename = rng.choice(ATTACHMENTS)
    encoded = base64.encodebytes(blob).replace(b"\n", b"\r\n")
    head = (
        f'Content-Type: {maintype}/{subtype}; name="{filename}"\r\n'
        f'Content-Disposition: attachment; filename="{filename}"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    )
    return head.encode() + encoded


def _message(i: int, rng: random.Random, attachments: list[bytes]) -> bytes:
    name, official, personal = rng.choice(STAFF)
    who = rng.choice(OTHERS)
    outgoing = rng.random() < 0.5
    sender = (name, personal if personal and rng.random() < 0.2 else official) if outgoing else who
    recipient = who if outgoing else (name, official)
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(1795000000 + i * 173))
    head = (
        f"Received: from mx{i % 7}.example.net (mx{i % 7}.example.net [192.0.2.{i % 250}]) by mail1\r\n"
        f"From: {sender[0]} <{sender[1]}>\r\nTo: {recipient[0]} <{recipient[1]}>\r\n"
        f"Subject: {rng.choice(SUBJECTS)}\r\nDate: {date}\r\n"
        f"Message-ID: <bench{i}.{rng.getrandbits(40):x}@example.net>\r\nMIME-Version: 1.0\r\n"
    ).encode()
    body = EmailMessage()
    text = "\n\n".join(rng.choice(PARAGRAPHS) for _ in range(rng.randint(2, 8)))
    kind = rng.random()
    if kind < 0.15:
        body.set_content(f"<html><body><p>{text.replace(chr(10), '<br>')}</p></body></html>", subtype="html")
    else:
        body.set_content(text + f"\n\n{sender[0]}\n")
        if kind < 0.6:
            body.add_alternative(f"<html><body><p>{text}</p><p>{sender[0]}</p></body></html>", subtype="html")
    if i % 17 == 1:
        inner = EmailMessage()
        inner["From"] = f"{who[0]} <{who[1]}>"
        inner["Subject"] = rng.choice(SUBJECTS)
        inner.set_content(rng.choice(PARAGRAPHS))
        body.add_attachment(inner)
    del body["MIME-Version"]
    part = body.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if i % 3:
        return head + part
    boundary = f"=_bench_{i}".encode()
    return (
        head
        + b'Content-Type: multipart/mixed; boundary="'
        + boundary
        + b'"\r\n\r\n--'
        + boundary
        + b"\r\n"
        + part
        + b"\r\n--"
        + boundary
        + b"\r\n"
        + rng.choice(attachments)
        + b"\r\n--"
        + boundary
        + b"--\r\n"
    )


def fill_maildir(maildir: Path, count: int, seed: int = 7) -> tuple[int, int]:
    """Write `count` messages into Maildir/cur; returns (bytes written, messages marked read)."""
    rng = random.Random(seed)
    attachments = [_attachment(rng.randbytes(rng.randint(50_000, 500_000)), rng) for _ in range(24)]
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    total = seen = 0
    for i in range(count):
        raw = _message(i, rng, attachments)
        read = rng.random() < 0.5
        seen += read
        name = f"{1795000000 + i}.M{i}P1.bench:2,{'S' if read else ''}"
        (maildir / "cur" / name).write_bytes(raw)
        total += len(raw)
    return total, seen


# ---- phases, each run in its own process ------------------------------------------------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase_ours(args: argparse.Namespace) -> dict[str, Any]:
    from auditd.config import ImapSource
    from auditd.sources.imap import Meter, read_imap
    from auditd.sources.mailfile import MailStats

    src = ImapSource.model_validate(
        {
            "name": "bench",
            "type": "imap",
            "host": "127.0.0.1",
            "port": args.port,
            "tls": False,
            "username": "audit",
            "password_file": str(args.password_file),
            "folders": ["INBOX"],
        }
    )
    cp = Path(args.checkpoints)
    previous = json.loads(cp.read_text()) if args.phase == "rescan" else {}
    stats, meter = MailStats(), Meter()
    checkpoints = dict(previous)
    start = time.perf_counter()
    n = 0
    chars = 0
    for msg, update in read_imap(src, base=cp.parent, previous=previous, stats=stats, meter=meter):
        n += 1
        chars += len(msg.text)
        checkpoints.update(update)
    wall = time.perf_counter() - start
    if args.phase == "full":
        cp.write_text(json.dumps(checkpoints))
    return {
        "messages": n,
        "wall": wall,
        "rss_mb": _peak_rss_mb(),
        "fetches": meter.fetches,
        "fetched_bytes": meter.bytes,
        "mailbox_bytes": meter.mailbox_bytes,
        "unparseable": stats.unparseable,
        "text_chars": chars,
    }


def phase_naive(args: argparse.Namespace) -> dict[str, Any]:
    from imapclient import IMAPClient

    start = time.perf_counter()
    c = IMAPClient("127.0.0.1", port=args.port, ssl=False, timeout=120)
    c.login("audit", Path(args.password_file).read_text().strip())
    c.select_folder("INBOX", readonly=True)
    uids = c.search(["ALL"])
    n = got = 0
    for i in range(0, len(uids), 200):
        for data in c.fetch(uids[i : i + 200], [b"BODY.PEEK[]"]).values():
            got += len(data[b"BODY[]"])
            n += 1
    c.logout()
    return {
        "messages": n,
        "wall": time.perf_counter() - start,
        "rss_mb": _peak_rss_mb(),
        "fetched_bytes": got,
    }


def _child(phase: str, port: int, password_file: Path, checkpoints: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--phase", phase, "--port", str(port)]
    cmd += ["--password-file", str(password_file), "--checkpoints", str(checkpoints)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _flags(server: Any) -> tuple[int, int]:
    c = server.client()
    try:
        status = c.folder_status("INBOX", [b"MESSAGES", b"UNSEEN"])
        return int(status[b"MESSAGES"]), int(status[b"UNSEEN"])
    finally:
        c.logout()


def _server_out(server: Any, before: int) -> int | None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        sent = server.logged_out_bytes()
        if len(sent) > before:
            return int(sent[-1])
        time.sleep(0.05)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--keep", action="store_true", help="leave the server's folder in place")
    ap.add_argument("--phase", choices=["full", "rescan", "naive"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--password-file", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoints", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        result = phase_naive(args) if args.phase == "naive" else phase_ours(args)
        print(json.dumps(result))
        return 0

    from tests.mail.dovecot import Dovecot, available

    if not available():
        print("Dovecot is not installed (apt-get install dovecot-imapd)", file=sys.stderr)
        return 2
    server = Dovecot().start()
    try:
        t0 = time.perf_counter()
        size, seen = fill_maildir(server.maildir, args.messages)
        server.chown_mail()
        written = time.perf_counter() - t0
        t0 = time.perf_counter()
        messages, unseen = _flags(server)  # Dovecot indexes the new folder here (no bodies parsed)
        indexed = time.perf_counter() - t0
        if messages != args.messages or unseen != args.messages - seen:
            raise SystemExit(f"Dovecot sees {messages} messages, {unseen} unread: not what was written")
        print(
            f"mailbox: {messages} messages, {size / 1e6:.0f} MB, {unseen} unread "
            f"(written in {written:.1f} s, indexed by Dovecot in {indexed:.1f} s)"
        )
        pw = server.root / "bench-password"
        pw.write_text(server.password)
        cp = server.root / "bench-checkpoints.json"
        rows: list[tuple[str, dict[str, Any]]] = []
        for label, phase in (
            ("ours: full scan (cold)", "full"),
            ("naive: BODY.PEEK[] of all", "naive"),
            ("ours: rescan, no change", "rescan"),
            ("ours: full scan (warm)", "full"),
        ):
            sessions = len(server.logged_out_bytes())
            result = _child(phase, server.port, pw, cp)
            result["server_out"] = _server_out(server, sessions)
            rows.append((label, result))
        after = _flags(server)
        print()
        print(f"{'':28} {'wall s':>8} {'msg/s':>9} {'peak RSS MB':>12} {'server sent MB':>15} {'fetches':>8}")
        for label, r in rows:
            rate = r["messages"] / r["wall"] if r["wall"] and r["messages"] else 0
            sent = f"{r['server_out'] / 1e6:.2f}" if r["server_out"] is not None else "?"
            fetches = r.get("fetches", "")
            print(f"{label:28} {r['wall']:8.2f} {rate:9.0f} {r['rss_mb']:12.1f} {sent:>15} {fetches:>8}")
        full, naive, rescan, warm = (r for _, r in rows)
        speedup = naive["wall"] / full["wall"]
        print()
        print(
            f"messages read: ours {full['messages']}, naive {naive['messages']}, rescan {rescan['messages']}"
        )
        print(
            f"bytes of mail fetched: ours {full['fetched_bytes'] / 1e6:.1f} MB"
            f" of {full['mailbox_bytes'] / 1e6:.0f} MB"
            f" ({100 * full['fetched_bytes'] / max(full['mailbox_bytes'], 1):.1f}%); "
            f"naive {naive['fetched_bytes'] / 1e6:.0f} MB"
        )
        print(f"full scan vs naive: {speedup:.1f}x faster (cold), {naive['wall'] / warm['wall']:.1f}x (warm)")
        link = 100e6 / 8  # what the transfers alone would take on a 100 Mbit/s link to the server
        if full["server_out"] and naive["server_out"]:
            print(
                f"on a 100 Mbit/s link, transfer alone: ours {full['server_out'] / link:.1f} s,"
                f" naive {naive['server_out'] / link:.0f} s (loopback makes the naive fetch look cheap)"
            )
        print(
            f"flags unchanged: {after == (messages, unseen)}"
            f" (messages, unread: before {messages, unseen}, after {after})"
        )
        targets = [
            ("full scan >= 3x faster than naive", speedup >= 3),
            ("no-change rescan < 1 s", rescan["wall"] < 1 and rescan["messages"] == 0),
            ("peak RSS < 200 MB (our scans)", max(full["rss_mb"], rescan["rss_mb"], warm["rss_mb"]) < 200),
            ("no flag changed", after == (messages, unseen)),
        ]
        for name, ok in targets:
            print(f"  {'PASS' if ok else 'FAIL'}  {name}")
        return 0 if all(ok for _, ok in targets) else 1
    finally:
        if args.keep:
            print(f"kept {server.root} (server stopped)")
            if server.process is not None:
                server.process.terminate()
                server.process.wait()
        else:
            server.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
