"""Sites sharing one store, migration to sites, and files claimed once by several readers.

Run on SQLite and on a throwaway PostgreSQL cluster (tests/store/pgcluster.py)."""

from __future__ import annotations

import multiprocessing
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from auditd.errors import StoreError
from auditd.model import Evidence, Finding, Severity, Status, Subject
from auditd.store import MIGRATIONS, PG_MIGRATIONS, SCHEMA_VERSION, Store

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
T = NOW.isoformat(timespec="microseconds")
JANE = Subject(staff="jane.smith@choysez.org.uk", address="jane.smith77@gmail.com")
Opener = Callable[..., Store]


def finding(key: str, *, fp: str = "fp-1", at: datetime = NOW) -> Finding:
    return Finding(
        rule="MAIL-PERSONAL-SENDER",
        clauses=("SMP-1.5",),
        severity=Severity.MEDIUM,
        subject=JANE,
        fingerprint=fp,
        first_seen=at,
        last_seen=at,
        pupil_involved=False,
        evidence=(Evidence(key=key, observed_at=at, data={"subject": key}),),
        reasons=("personal address",),
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens connections to ONE store (as several daemons would), each with its own site/scope."""
    opened: list[Store] = []
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None

    def open_(site: str = "", scope: str | None = None) -> Store:
        if url is None:
            s = Store.open(tmp_path / "auditd.db", site=site, scope=scope)
        else:
            s = Store.open_postgresql(url, site=site, scope=scope)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        s.close()


def test_same_message_at_two_sites_is_one_finding_per_site(opener: Opener) -> None:
    north, south = opener("north", "north"), opener("south", "south")
    trust = opener()
    assert north.record_findings([finding("a")], now=NOW).new == 1
    assert south.record_findings([finding("a"), finding("b", fp="fp-2")], now=NOW).new == 2
    assert north.record_findings([finding("c")], now=NOW).updated == 1  # same site: evidence added
    assert [f.fingerprint for f in north.list_findings()] == ["fp-1"]
    assert north.list_findings()[0].occurrences == 2
    assert sorted(f.fingerprint for f in south.list_findings()) == ["fp-1", "fp-2"]
    assert len(trust.list_findings()) == 3
    assert north.count_findings() == {"open": 1} and trust.count_findings() == {"open": 3}
    assert len(south.created_times(since=NOW - timedelta(days=1))) == 2
    # A site's reader cannot reach another site's finding by its number.
    south_id = south.list_findings()[0].id
    with pytest.raises(Exception, match="no finding"):
        north.get_finding(south_id)


def test_checkpoints_runs_and_digests_are_per_site(opener: Opener) -> None:
    north, south, trust = opener("north", "north"), opener("south", "south"), opener()
    north.set_checkpoint("zeek", "pos", "1", NOW)
    south.set_checkpoint("zeek", "pos", "2", NOW)
    assert (north.get_checkpoint("zeek", "pos"), south.get_checkpoint("zeek", "pos")) == ("1", "2")
    for s in (north, south):
        run = s.start_run("zeek", "net", NOW)
        s.finish_run(run, status="ok", items=1, skipped=0, findings=0, error=None, now=NOW)
    assert len(north.last_runs()) == 1 and len(trust.last_runs()) == 2
    north.mark_digest("2026-11-24", "ict@x.org", status="sent", message_id="<n@x>", now=NOW)
    assert south.digest_record("2026-11-24", "ict@x.org") is None
    assert trust.digest_record("2026-11-24", "ict@x.org") is None  # the trust-wide digest is its own
    assert north.last_digest_day() == "2026-11-24" and south.last_digest_day() is None


def test_approvals_per_site_or_trust_wide(opener: Opener) -> None:
    north, south, trust = opener("north", "north"), opener("south", "south"), opener()
    day = timedelta(days=1)
    grant = {
        "rule": "MAIL-PERSONAL-SENDER",
        "subject": Subject(staff=JANE.staff),
        "valid_from": NOW - day,
        "valid_until": NOW + day,
        "approved_by": "centre.manager@choysez.org.uk",
        "reason": "trip",
        "now": NOW,
    }
    north.grant_approval(**grant)  # type: ignore[arg-type]
    assert north.record_findings([finding("a")], now=NOW).new == 1
    assert south.record_findings([finding("a")], now=NOW).new == 1
    assert north.list_findings()[0].status == Status.APPROVED
    assert south.list_findings()[0].status == Status.OPEN  # north's approval does not reach south
    _, changed = trust.grant_approval(**grant)  # type: ignore[arg-type]
    assert changed == 1 and south.list_findings()[0].status == Status.APPROVED
    assert len(south.list_approvals()) == 1 and len(trust.list_approvals()) == 2


def test_file_claims_once_with_a_lease(opener: Opener) -> None:
    a, b = opener("north", "north"), opener("south", "south")
    args = {"source": "zeek", "path": "/x/conn.log.gz", "lease": timedelta(hours=1)}
    assert a.claim_file("id-1", owner="a", now=NOW, **args)  # type: ignore[arg-type]
    assert not b.claim_file("id-1", owner="b", now=NOW, **args)  # type: ignore[arg-type]
    # a died: after the lease b takes over, and a's late finish is refused with its transaction.
    later = NOW + timedelta(hours=2)
    assert b.claim_file("id-1", owner="b", now=later, **args)  # type: ignore[arg-type]

    def late_finish() -> None:
        with a.transaction():
            a.record_findings([finding("late")], now=later)
            a.finish_file("id-1", owner="a", now=later)

    with pytest.raises(StoreError, match="lost the claim"):
        late_finish()
    assert a.list_findings() == []
    b.finish_file("id-1", owner="b", now=later)
    assert not a.claim_file("id-1", owner="a", now=later + timedelta(days=1), **args)  # type: ignore[arg-type]


def _race(target: str, site: str, n: int, start: float) -> None:
    import time

    store = Store.open_postgresql(target, site=site) if "://" in target else Store.open(target, site=site)
    time.sleep(max(0.0, start - time.time()))
    with store:
        for i in range(n):
            store.record_findings([finding(f"{site}-{i}", fp=f"fp-{i % 7}")], now=NOW)


def test_concurrent_writers_of_two_sites_lose_nothing(opener: Opener, tmp_path: Path) -> None:
    import time

    probe = opener()
    target = str(tmp_path / "auditd.db") if probe.dialect == "sqlite" else probe.where
    start = time.time() + 0.5
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_race, args=(target, site, 40, start)) for site in ("a", "a", "b", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    found = probe.list_findings(with_evidence=True)
    # Two writers per site raced on the same fingerprints: 7 findings per site, every observation kept.
    assert len(found) == 14
    assert sum(len(f.evidence) for f in found) == 80  # keys repeat between a site's two writers
    assert sum(f.occurrences for f in found) == 80


def test_sqlite_v3_store_migrates_to_sites_keeping_evidence(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for script in MIGRATIONS[:3]:
        conn.executescript(script)
    conn.executescript(
        """INSERT INTO findings (id, fingerprint, rule, clauses, severity, status, first_seen, last_seen,
             created_at, updated_at) VALUES (1, 'fp-1', 'R', '[]', 'medium', 'open', 't', 't', 't', 't');
           INSERT INTO evidence (finding_id, key, observed_at, data) VALUES (1, 'k', 't', '{}');
           INSERT INTO checkpoints VALUES ('src', 'pos', '42', 't');
           PRAGMA user_version = 3;"""
    )
    conn.close()
    with Store.open(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.get_checkpoint("src", "pos") == "42"
        raw = sqlite3.connect(path)
        assert raw.execute("SELECT count(*) FROM evidence").fetchone()[0] == 1
        assert raw.execute("SELECT site, fingerprint FROM findings").fetchall() == [("", "fp-1")]
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
        raw.close()
    assert (tmp_path / "old.db.v3.bak").exists()


def test_postgresql_v3_store_migrates_to_sites(pg_url: str) -> None:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        for script in PG_MIGRATIONS[:3]:
            conn.execute(script)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (3)")
        conn.execute(
            """INSERT INTO findings (fingerprint, rule, clauses, severity, status, first_seen, last_seen,
                 created_at, updated_at) VALUES ('fp-1', 'R', '[]', 'medium', 'open', %s, %s, %s, %s)""",
            (T, T, T, T),
        )
        conn.execute("INSERT INTO checkpoints VALUES ('src', 'pos', '42', 't')")
    with Store.open_postgresql(pg_url, site="north") as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.get_checkpoint("src", "pos") is None  # it belongs to the unnamed site now
        store.site = ""
        assert store.get_checkpoint("src", "pos") == "42"
        assert [f.fingerprint for f in store.list_findings()] == ["fp-1"]
