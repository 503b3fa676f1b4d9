"""Trust-wide scale: SQLite and PostgreSQL side by side.

    .venv/bin/python bench/scale.py [--findings 5000000] [--sites 50] [--mailboxes 2000] [--backend both]

Loads a store with `--findings` findings spread over `--sites` sites (one evidence row each) and the
checkpoints of `--mailboxes` mailboxes (two folders each) per site, in bulk (executemany in big
transactions; the Store API commits per batch and would take far longer), then times:
  * a daily digest for one site (`auditd.digest.send.collect`, the sample school's config);
  * a trust-wide findings query (`iter_findings(status=open, rule=...)` over every site);
  * concurrent writes: 8 processes, each recording 2,000 findings for its own site through the Store;
  * the Zeek ingest rate: `read_log` + classify on a generated ssl.log (bench/logs.py's generator).
PostgreSQL runs in a throwaway cluster (tests/store/pgcluster.py). Load time is reported apart.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from auditd.config import load_config  # noqa: E402
from auditd.digest.send import collect  # noqa: E402
from auditd.model import Evidence, Finding, Severity, Status, Subject  # noqa: E402
from auditd.policy import load_policy  # noqa: E402
from auditd.store import Store, ts  # noqa: E402

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
RULES = ["MAIL-PERSONAL-SENDER", "MAIL-PERSONAL-RECIPIENT", "NET-STREAMING-IN-CLASS", "MAIL-AUTO-FORWARD"]


def load(store: Store, findings: int, sites: int, mailboxes: int, days: int = 90) -> None:
    rng = random.Random(1)
    batch = 20000
    done = 0
    while done < findings:
        rows, ev = [], []
        for i in range(done, min(findings, done + batch)):
            at = NOW - timedelta(seconds=rng.randrange(days * 86400))
            t = ts(at)
            site = f"site{i % sites:02d}"
            staff = f"staff{rng.randrange(400)}@{site}.example.org"
            status = "open" if rng.random() < 0.3 else rng.choice(["dismissed", "confirmed", "approved"])
            rows.append(
                (i + 1, site, f"fp-{i}", rng.choice(RULES), '["SMP-1.5"]', "medium", status, staff,
                 f"home{i % 997}@gmail.com", t, t, 1, 0, "[]", t, t)
            )  # fmt: skip
            ev.append((i + 1, f"k{i}", t, json.dumps({"subject": f"homework {i}"})))
        with store.transaction():
            store._many(
                "INSERT INTO findings (id, site, fingerprint, rule, clauses, severity, status, staff, "
                "address, first_seen, last_seen, occurrences, pupil_involved, reasons, created_at, "
                "updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            store._many("INSERT INTO evidence (finding_id, key, observed_at, data) VALUES (?, ?, ?, ?)", ev)
        done += len(rows)
    cps = [
        (f"site{s:02d}", "ews", f"mb{m}:{folder}", "AAMk" + "x" * 40, ts(NOW))
        for s in range(sites)
        for m in range(mailboxes)
        for folder in ("inbox", "sent")
    ]
    with store.transaction():
        store._many(
            "INSERT INTO checkpoints (site, source, key, value, updated_at) VALUES (?, ?, ?, ?, ?)", cps
        )
    if store.dialect == "postgresql":
        store._conn.execute("SELECT setval(pg_get_serial_sequence('findings', 'id'), %s)", (findings + 1,))
        store._conn.execute("ANALYZE")
    else:
        store._conn.execute("ANALYZE")


def _writer(target: str, site: str, n: int, start: float) -> None:
    store = Store.open_postgresql(target, site=site) if "://" in target else Store.open(target, site=site)
    time.sleep(max(0.0, start - time.time()))
    with store:
        for i in range(0, n, 20):
            batch = [
                Finding(
                    rule="MAIL-PERSONAL-SENDER",
                    clauses=("SMP-1.5",),
                    severity=Severity.MEDIUM,
                    subject=Subject(staff=f"w{j}@{site}.example.org", address=f"w{j}@gmail.com"),
                    fingerprint=f"w-{site}-{j}",
                    first_seen=NOW,
                    last_seen=NOW,
                    pupil_involved=False,
                    evidence=(Evidence(key=f"w{j}", observed_at=NOW, data={"subject": "x"}),),
                    reasons=(),
                )
                for j in range(i, i + 20)
            ]
            store.record_findings(batch, now=NOW, approvals=[])


def measure(name: str, opener: object, target: str, args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    store: Store = opener()  # type: ignore[operator]
    t = time.perf_counter()
    load(store, args.findings, args.sites, args.mailboxes)
    out["load_s"] = time.perf_counter() - t
    config = load_config(ROOT / "deploy" / "sample-school" / "config.toml")
    policy = load_policy(config.policy.dir)
    store.scope = "site07"
    t = time.perf_counter()
    data = collect(config, store, policy, date(2026, 11, 24), NOW, window=(NOW - timedelta(days=1), NOW))
    out["digest_site_s"] = time.perf_counter() - t
    out["digest_site_new"] = len(data.new)
    store.scope = None
    t = time.perf_counter()
    n = sum(1 for _ in store.iter_findings(status=Status.OPEN, rule="NET-STREAMING-IN-CLASS"))
    out["trust_query_s"] = time.perf_counter() - t
    out["trust_query_rows"] = n
    store.close()
    per = 2000
    start = time.time() + 1.0
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(target, f"w{k}", per, start)) for k in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    out["writes_8proc_per_s"] = 8 * per / (time.time() - start)
    print(name, json.dumps({k: round(v, 3) for k, v in out.items()}), flush=True)
    return out


def zeek_rate(lines: int) -> float:
    sys.path.insert(0, str(ROOT / "bench"))
    from logs import write_zeek  # type: ignore[import-not-found]

    from auditd.pipeline import matches_only  # noqa: F401  (the same name filter the scan uses)
    from auditd.sources.netlogs import LogStats, read_log

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ssl.log"
        write_zeek(path, lines)
        stats = LogStats()
        t = time.perf_counter()
        for _ in read_log(path, "zeek", source="bench", stats=stats):
            pass
        return stats.lines / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--findings", type=int, default=5_000_000)
    ap.add_argument("--sites", type=int, default=50)
    ap.add_argument("--mailboxes", type=int, default=2000)
    ap.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--zeek-lines", type=int, default=500_000)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.backend in ("sqlite", "both"):
            path = str(Path(tmp) / "auditd.db")
            results["SQLite"] = measure("sqlite", lambda: Store.open(path), path, args)
        if args.backend in ("postgresql", "both"):
            from tests.store.pgcluster import Cluster, pg_bin

            bindir = pg_bin()
            assert bindir is not None, "install Debian's postgresql"
            cluster = Cluster(bindir)
            try:
                url = cluster.database()
                results["PostgreSQL"] = measure("postgresql", lambda: Store.open_postgresql(url), url, args)
            finally:
                cluster.stop()
    rate = zeek_rate(args.zeek_lines)
    print(f"\n{args.findings:,} findings, {args.sites} sites, {args.mailboxes:,} mailboxes per site")
    print("| | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for key, label in (
        ("load_s", "bulk load (s)"),
        ("digest_site_s", "daily digest, one site (s)"),
        ("trust_query_s", "trust-wide open streaming findings (s)"),
        ("trust_query_rows", "  rows"),
        ("writes_8proc_per_s", "8 processes writing, findings/s"),
    ):
        print(f"| {label} | " + " | ".join(f"{r[key]:,.2f}" for r in results.values()) + " |")
    print(f"\nZeek ssl.log ingest (read_log, all lines): {rate:,.0f} lines/s")


if __name__ == "__main__":
    main()
