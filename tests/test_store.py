"""The store's contract, on a real SQLite file and on a real PostgreSQL server (a throwaway cluster):
de-duplication, reviews, approvals, audit, retention, safety. Both backends give the same results."""

from __future__ import annotations

import os
import sqlite3
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from auditd.errors import StoreError, UsageError
from auditd.model import Evidence, Finding, Severity, Status, Subject
from auditd.store import SCHEMA_VERSION, Store

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
JANE = Subject(staff="jane.smith@choysez.org.uk", address="jane.smith77@gmail.com")


def finding(key: str, at: datetime, *, fp: str | None = None, subject: Subject = JANE) -> Finding:
    return Finding(
        rule="MAIL-PERSONAL-SENDER",
        clauses=("SMP-1.5", "SMP-1.6"),
        severity=Severity.MEDIUM,
        subject=subject,
        fingerprint=fp or f"fp-{key}",
        first_seen=at,
        last_seen=at,
        pupil_involved=False,
        evidence=(Evidence(key=key, observed_at=at, data={"subject": f"homework {key}"}),),
        reasons=("sender is Jane Smith's personal address",),
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "sqlite":
        s = Store.open(tmp_path / "state" / "auditd.db")
    else:
        s = Store.open_postgresql(request.getfixturevalue("pg_url"))
    yield s  # type: ignore[misc]
    s.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "state" / "auditd.db")
    yield s  # type: ignore[misc]
    s.close()


def raw(store: Store, sql: str) -> list[tuple[Any, ...]]:
    """Run SQL on a connection of its own, as another program with access to the store would."""
    if store.dialect == "sqlite":
        conn = sqlite3.connect(store.path)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(store.where, autocommit=True) as pg:
        cur = pg.execute(sql)
        return cur.fetchall() if cur.description else []


def test_file_is_private_and_in_wal_mode(sqlite_store: Store) -> None:
    store = sqlite_store
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    store.record_findings([finding("a", NOW)], now=NOW)
    for extra in ("-wal", "-shm"):
        side = store.path.with_name(store.path.name + extra)
        if side.exists():
            assert stat.S_IMODE(os.stat(side).st_mode) & 0o077 == 0
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert store.schema_version == SCHEMA_VERSION


def test_same_input_twice_adds_nothing_and_new_evidence_counts(store: Store) -> None:
    first = store.record_findings([finding("a", NOW), finding("b", NOW)], now=NOW)
    again = store.record_findings([finding("a", NOW), finding("b", NOW)], now=NOW)
    assert (first.new, again.new, again.updated) == (2, 0, 0)
    later = NOW + timedelta(hours=1)
    grown = store.record_findings([finding("c", later, fp="fp-a")], now=later)
    assert (grown.new, grown.updated) == (0, 1)
    a = store.list_findings(with_evidence=True)[0]
    assert a.occurrences == 2 and a.last_seen == later and a.first_seen == NOW
    assert [e.key for e in a.evidence] == ["a", "c"]


def test_dismissed_finding_does_not_come_back(store: Store) -> None:
    store.record_findings([finding("a", NOW)], now=NOW)
    fid = store.list_findings()[0].id
    reviewed = store.review(fid, Status.DISMISSED, by="dsl@choysez.org.uk", note="teaching use", now=NOW)
    assert reviewed.status == Status.DISMISSED and reviewed.review_note == "teaching use"
    store.record_findings([finding("a", NOW), finding("z", NOW, fp="fp-a")], now=NOW)
    assert [f.status for f in store.list_findings()] == [Status.DISMISSED]
    with pytest.raises(UsageError, match="no finding #999"):
        store.review(999, Status.CONFIRMED, by="x@y.z", note=None, now=NOW)
    actions = [e.action for e in store.list_audit()]
    assert actions == ["finding.dismiss"]


def test_approval_covers_only_its_period_and_revocation_keeps_the_past(store: Store) -> None:
    day = timedelta(days=1)
    store.record_findings([finding("before", NOW - 3 * day), finding("during", NOW - day)], now=NOW)
    approval, changed = store.grant_approval(
        rule="MAIL-PERSONAL-SENDER",
        subject=Subject(staff="Jane.Smith@choysez.org.uk"),
        valid_from=NOW - 2 * day,
        valid_until=NOW + 2 * day,
        approved_by="centre.manager@choysez.org.uk",
        reason="residential trip",
        now=NOW,
    )
    assert changed == 1  # never reaches back before valid_from
    statuses = {f.evidence[0].key: (f.status, f.approval_id) for f in store.list_findings(with_evidence=True)}
    assert statuses == {"before": (Status.OPEN, None), "during": (Status.APPROVED, approval.id)}
    # A new finding inside the period is approved on arrival.
    result = store.record_findings([finding("new", NOW + timedelta(hours=1))], now=NOW)
    assert result.new == 1
    assert store.list_findings(ids=list(result.new_ids))[0].status == Status.APPROVED
    revoked, reopened = store.revoke_approval(
        approval.id, by="centre.manager@choysez.org.uk", reason="over", now=NOW
    )
    assert revoked.revoked_at == NOW and revoked.effective_until == NOW
    assert reopened == 1  # the one seen after the revocation
    during = next(f for f in store.list_findings(with_evidence=True) if f.evidence[0].key == "during")
    assert during.status == Status.APPROVED
    with pytest.raises(UsageError, match="already revoked"):
        store.revoke_approval(approval.id, by="centre.manager@choysez.org.uk", reason="again", now=NOW)
    log = store.list_audit()
    assert [e.action for e in log] == ["approval.grant", "approval.revoke"]
    assert log[0].actor == "centre.manager@choysez.org.uk" and log[0].details["reason"] == "residential trip"


def test_audit_log_is_append_only(store: Store) -> None:
    store.audit("sysadmin", "test.entry", "store", {}, now=NOW)
    with pytest.raises(Exception, match="append-only"):
        raw(store, "UPDATE audit_log SET actor = 'someone else'")
    assert [e.actor for e in store.list_audit()] == ["sysadmin"]


def test_findings_and_checkpoint_commit_together(store: Store) -> None:
    def interrupted() -> None:
        with store.transaction():
            store.record_findings([finding("a", NOW)], now=NOW)
            store.set_checkpoint("src", "position", "42", NOW)
            raise RuntimeError("killed mid-batch")

    with pytest.raises(RuntimeError):
        interrupted()
    assert store.list_findings() == [] and store.get_checkpoint("src", "position") is None
    with store.transaction():
        store.record_findings([finding("a", NOW)], now=NOW)
        store.set_checkpoint("src", "position", "42", NOW)
    assert len(store.list_findings()) == 1 and store.get_checkpoints("src") == {"position": "42"}


def test_runs_give_source_health(store: Store) -> None:
    r1 = store.start_run("imap", "mail", NOW)
    store.finish_run(r1, status="ok", items=10, skipped=1, findings=2, error=None, now=NOW)
    r2 = store.start_run("imap", "mail", NOW + timedelta(hours=1))
    store.finish_run(r2, status="failed", items=0, skipped=0, findings=0, error="unreachable", now=NOW)
    last = store.last_runs()
    assert [(r.source, r.status, r.error) for r in last] == [("imap", "failed", "unreachable")]
    ok = store.last_success("imap")
    assert ok is not None and ok.items == 10


def test_retention_purges_old_rows_and_keeps_the_audit_log(store: Store) -> None:
    old = NOW - timedelta(days=100)
    store.record_findings([finding("old", old), finding("recent", NOW)], now=old)
    store.set_checkpoint("src", "stale", "1", old)
    store.audit("sysadmin", "test.entry", "store", {}, now=old)
    result = store.purge(before=NOW - timedelta(days=90), now=NOW)
    assert (result.findings, result.checkpoints, result.audit) == (1, 1, 0)
    assert [f.evidence[0].key for f in store.list_findings(with_evidence=True)] == ["recent"]
    assert raw(store, "SELECT count(*) FROM evidence")[0][0] == 1
    assert [e.action for e in store.list_audit()] == ["test.entry", "retention.purge"]
    # Older than the horizon is not recorded again when a rescan meets it.
    again = store.record_findings([finding("old", old)], now=NOW, not_before=NOW - timedelta(days=90))
    assert again.new == 0


def test_digest_records(store: Store) -> None:
    store.mark_digest("2026-11-24", "ict@x.org", status="pending", now=NOW)
    store.mark_digest("2026-11-24", "ict@x.org", status="failed", error="refused", now=NOW)
    store.mark_digest("2026-11-24", "ict@x.org", status="sent", message_id="<m@x>", now=NOW)
    rec = store.digest_record("2026-11-24", "ict@x.org")
    assert rec is not None and (rec.status, rec.attempts, rec.message_id) == ("sent", 2, "<m@x>")
    assert store.last_digest_day() == "2026-11-24"


def test_newer_schema_and_garbage_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this choysez-auditd"):
        Store.open(path)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=str(junk)):
        Store.open(junk)
    assert junk.read_bytes() == b"this is not a database" * 100  # never overwritten


def test_subject_filter_is_case_insensitive(store: Store) -> None:
    other = Subject(staff="tom.baker@choysez.org.uk", address="tbaker.home@outlook.com")
    store.record_findings([finding("a", NOW), finding("b", NOW, subject=other)], now=NOW)
    found = store.list_findings(subject=Subject(staff="JANE.SMITH@choysez.org.uk"))
    assert [f.subject.staff for f in found] == ["jane.smith@choysez.org.uk"]
