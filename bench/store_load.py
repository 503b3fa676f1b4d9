"""Build a store with many findings and time what the ICT manager runs on it.

    .venv/bin/python bench/store_load.py --findings 1000000 [--dir DIR] [--keep]

The store is made by `Store.open` (so the schema is the real one) and filled with direct SQL in big
transactions (the Store API commits per finding batch and would take far longer to fill 1M rows);
each finding gets one evidence row, like a mail finding. Then it times the installed command:
`findings --format json`, `findings --format csv`, `findings --status open` (table) and
`digest --output`, and prints one line per command with seconds and peak memory (MiB).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "deploy" / "sample-school"
COMMAND = Path(sys.executable).parent / "choysez-auditd"
RULES = ("MAIL-PERSONAL-SENDER", "MAIL-PERSONAL-RECIPIENT", "NET-STREAMING-IN-CLASS")
STATUSES = ("open", "open", "open", "confirmed", "dismissed", "approved")


def ts(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def build(school: Path, n: int, now: datetime, batch: int = 50_000) -> float:
    """Fill school/auditd.db with n findings (and one evidence each); returns seconds taken."""
    from auditd.store import Store

    db = school / "auditd.db"
    Store.open(db).close()
    started = time.perf_counter()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    for start in range(0, n, batch):
        rows, ev = [], []
        for i in range(start, min(n, start + batch)):
            seen = ts(now - timedelta(minutes=i % (60 * 24 * 60)))
            rule = RULES[i % 3]
            mail = rule.startswith("MAIL")
            rows.append(
                (
                    i + 1,
                    f"bench-{i}",
                    rule,
                    json.dumps(["SMP-1.5", "SMP-1.6"] if mail else ["SMP-1.10"]),
                    "medium",
                    STATUSES[i % len(STATUSES)],
                    f"staff{i % 400}@choysez.org.uk" if mail else None,
                    f"person{i % 400}@gmail.com" if mail else None,
                    None if mail else f"Room {i % 30}",
                    None if mail else f"10.20.{i % 30}.{i % 250}",
                    None if mail else "Netflix",
                    seen,
                    seen,
                    i % 7 == 0,
                    json.dumps(["mentions pupil", "business terms: homework, trip"]),
                    seen,
                    seen,
                )
            )
            ev.append(
                (
                    i + 1,
                    f"<msg{i}@example.net>",
                    seen,
                    json.dumps({"subject": f"Homework for week {i % 52}", "from": "x@gmail.com"}),
                )
            )
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO findings (id, fingerprint, rule, clauses, severity, status, staff, address, room, "
            "device, service, first_seen, last_seen, occurrences, pupil_involved, reasons, created_at, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?)",
            rows,
        )
        conn.executemany("INSERT INTO evidence (finding_id, key, observed_at, data) VALUES (?, ?, ?, ?)", ev)
        conn.execute("COMMIT")
    conn.close()
    return time.perf_counter() - started


def timed(args: list[str]) -> tuple[float, float, int]:
    """Seconds, peak RSS of the child in MiB, and the exit status."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    proc = subprocess.run(
        [str(COMMAND), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
    )
    took = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        print(f"  exit {proc.returncode}: {proc.stderr.decode(errors='replace')[-300:]}", file=sys.stderr)
    return took, max(peak, before) / 1024, proc.returncode


def school_copy(dest: Path) -> Path:
    shutil.copytree(SAMPLE, dest, ignore=shutil.ignore_patterns("auditd.db*", "out"))
    return dest


def run(n: int, folder: Path) -> dict[str, float]:
    school = school_copy(folder / "school")
    now = datetime.now(UTC)
    results = {"build": build(school, n, now)}
    print(
        f"built {n} findings in {results['build']:.1f} s ({(school / 'auditd.db').stat().st_size >> 20} MiB)"
    )
    config = str(school / "config.toml")
    for name, args in (
        ("findings --format json", ["findings", "--format", "json"]),
        ("findings --format csv", ["findings", "--format", "csv"]),
        ("findings --status open", ["findings", "--status", "open"]),
        ("digest --output", ["digest", "--output", str(school / "out" / "digest.html"), "--format", "html"]),
    ):
        took, peak, code = timed([*args, "--config", config])
        results[name] = took
        print(f"{name:<26} {took:8.2f} s   peak RSS of any run so far {peak:8.0f} MiB   exit {code}")
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--findings", type=int, default=1_000_000)
    p.add_argument("--dir", type=Path, help="where to build (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the folder")
    a = p.parse_args()
    folder = a.dir or Path(tempfile.mkdtemp(prefix="choysez-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        run(a.findings, folder)
    finally:
        if not a.keep and a.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
