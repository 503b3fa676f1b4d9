"""The findings store: one SQLite file in WAL mode, private to the daemon's user (mode 0600).

It keeps findings (de-duplicated by a stable fingerprint), their evidence (metadata only),
approvals, an append-only audit log, per-source checkpoints, run records (source health) and
the record of digests sent. The schema is versioned (`PRAGMA user_version`) and migrated
forward on open, after a backup copy of the old file.

Every change is made in a transaction; a source's findings and its checkpoint are committed
together (`transaction()` nests with savepoints), so an interrupted scan loses or doubles nothing.
Times are stored as UTC ISO-8601 strings of fixed width, so they sort and compare as text.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from auditd.errors import StoreError, UsageError
from auditd.model import (
    Approval,
    AuditEntry,
    Evidence,
    Finding,
    JSONValue,
    NetObservation,
    RunRecord,
    Severity,
    Status,
    StoredFinding,
    Subject,
)

SUBJECT_PARTS = ("staff", "address", "room", "device", "service")

# Each entry moves the schema from version i to i + 1. Append; never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE findings (
        id INTEGER PRIMARY KEY,
        fingerprint TEXT NOT NULL UNIQUE,
        rule TEXT NOT NULL,
        clauses TEXT NOT NULL,
        severity TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('open', 'approved', 'confirmed', 'dismissed')),
        staff TEXT, address TEXT, room TEXT, device TEXT, service TEXT,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        occurrences INTEGER NOT NULL DEFAULT 1,
        pupil_involved INTEGER NOT NULL DEFAULT 0,
        approval_id INTEGER REFERENCES approvals(id),
        reasons TEXT NOT NULL DEFAULT '[]',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        reviewed_by TEXT, reviewed_at TEXT, review_note TEXT
    );
    CREATE INDEX findings_created ON findings(created_at);
    CREATE INDEX findings_last_seen ON findings(last_seen);
    CREATE INDEX findings_rule_status ON findings(rule, status);
    CREATE INDEX findings_staff ON findings(staff COLLATE NOCASE);
    CREATE TABLE evidence (
        id INTEGER PRIMARY KEY,
        finding_id INTEGER NOT NULL REFERENCES findings(id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        observed_at TEXT NOT NULL,
        data TEXT NOT NULL,
        UNIQUE (finding_id, key)
    );
    CREATE TABLE approvals (
        id INTEGER PRIMARY KEY,
        rule TEXT NOT NULL,
        staff TEXT, address TEXT, room TEXT, device TEXT, service TEXT,
        valid_from TEXT NOT NULL,
        valid_until TEXT NOT NULL,
        approved_by TEXT NOT NULL,
        reason TEXT NOT NULL,
        granted_at TEXT NOT NULL,
        revoked_at TEXT, revoked_by TEXT, revoke_reason TEXT,
        CHECK (valid_from < valid_until)
    );
    CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        details TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TRIGGER audit_log_append_only BEFORE UPDATE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TABLE checkpoints (
        source TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (source, key)
    );
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        kind TEXT NOT NULL,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        status TEXT NOT NULL,
        items INTEGER NOT NULL DEFAULT 0,
        skipped INTEGER NOT NULL DEFAULT 0,
        findings INTEGER NOT NULL DEFAULT 0,
        error TEXT
    );
    CREATE INDEX runs_source ON runs(source, id);
    CREATE TABLE digests (
        day TEXT NOT NULL,
        recipient TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        message_id TEXT,
        created_at TEXT NOT NULL,
        sent_at TEXT,
        PRIMARY KEY (day, recipient)
    );
    """,
    # 2: the review console's accounts, sessions (by the hash of their token) and its keys.
    """
    CREATE TABLE users (
        email TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('ict-manager', 'centre-manager', 'dsl', 'viewer')),
        password_hash TEXT,
        created_at TEXT NOT NULL,
        failed_attempts INTEGER NOT NULL DEFAULT 0,
        locked_until TEXT,
        last_signin TEXT
    );
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        email TEXT NOT NULL REFERENCES users(email) ON DELETE CASCADE,
        csrf TEXT NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        last_seen TEXT NOT NULL
    );
    CREATE INDEX sessions_email ON sessions(email);
    CREATE TABLE console_keys (
        name TEXT PRIMARY KEY,
        value BLOB NOT NULL
    );
    """,
    # 3: recent streaming observations, so a session split across two scans (a rotated capture,
    # a log read in two runs) is judged whole. Metadata only; pruned after a few hours.
    """
    CREATE TABLE net_recent (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        client TEXT NOT NULL,
        server TEXT NOT NULL,
        host TEXT NOT NULL,
        via TEXT NOT NULL,
        service TEXT,
        category TEXT,
        ts TEXT NOT NULL,
        first_seen TEXT,
        last_seen TEXT,
        bytes INTEGER,
        flow TEXT NOT NULL DEFAULT '',
        UNIQUE (source, client, server, host, via, ts, flow)
    );
    CREATE INDEX net_recent_source_ts ON net_recent(source, ts);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def ts(moment: datetime) -> str:
    """A datetime as stored: UTC, microseconds, fixed width (sorts as text)."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime given to the store")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _opt_ts(text: str | None) -> datetime | None:
    return None if text is None else parse_ts(text)


@dataclass(frozen=True)
class RecordResult:
    new: int
    updated: int
    new_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class PurgeResult:
    findings: int
    runs: int
    checkpoints: int
    audit: int


@dataclass(frozen=True)
class DigestRecord:
    day: str
    recipient: str
    status: str
    attempts: int
    last_error: str | None
    message_id: str | None
    sent_at: datetime | None


class Store:
    """A connection to the store. Use as a context manager: `with Store.open(path) as store:`."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn
        self._depth = 0

    # ---- opening and migrating ------------------------------------------------------------

    @classmethod
    def open(cls, path: Path | str) -> Store:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            created = not path.exists()
            if created:
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            old_umask = os.umask(0o077)  # the -wal and -shm files are private too
            try:
                conn = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
                conn.execute("PRAGMA journal_mode = WAL")
            finally:
                os.umask(old_umask)
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA busy_timeout = 30000")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store: {exc}", where=str(path)) from None
        store = cls(path, conn)
        try:
            store._migrate()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"not a choysez-auditd store or damaged: {exc}", where=str(path)) from None
        return store

    def _migrate(self) -> None:
        version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store schema version {version} is newer than this choysez-auditd knows "
                f"({SCHEMA_VERSION}); upgrade choysez-auditd",
                where=str(self.path),
            )
        if version == SCHEMA_VERSION:
            return
        if version > 0:
            self.backup(self.path.with_name(f"{self.path.name}.v{version}.bak"))
        for target in range(version, SCHEMA_VERSION):
            with self.transaction():
                for statement in _statements(MIGRATIONS[target]):
                    self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {target + 1}")

    def backup(self, dest: Path) -> None:
        """A consistent copy of the whole store (safe while the daemon runs)."""
        old_umask = os.umask(0o077)
        try:
            target = sqlite3.connect(dest)
            with target:
                self._conn.backup(target)
            target.close()
        finally:
            os.umask(old_umask)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    # ---- transactions -----------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction; nested calls become savepoints of the outer one.

        A write the disk or the database refuses (full disk, read-only file, damage) rolls the
        whole transaction back and becomes one StoreError naming the file: nothing half-written.
        """
        try:
            if self._depth == 0:
                self._conn.execute("BEGIN IMMEDIATE")
            else:
                self._conn.execute(f"SAVEPOINT sp{self._depth}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the store: {exc}", where=str(self.path)) from None
        self._depth += 1
        try:
            yield
        except BaseException as exc:
            self._depth -= 1
            self._undo()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot write the store: {exc}", where=str(self.path)) from None
            raise
        else:
            self._depth -= 1
            try:
                if self._depth == 0:
                    self._conn.execute("COMMIT")
                else:
                    self._conn.execute(f"RELEASE sp{self._depth}")
            except sqlite3.Error as exc:
                self._undo()
                raise StoreError(f"cannot write the store: {exc}", where=str(self.path)) from None

    def _undo(self) -> None:
        """Roll back the innermost level (SQLite may already have rolled back on a full disk)."""
        try:
            if self._depth == 0:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
            else:
                self._conn.execute(f"ROLLBACK TO sp{self._depth}")
                self._conn.execute(f"RELEASE sp{self._depth}")
        except sqlite3.Error:
            pass  # the transaction is gone already; SQLite left the file as it was before it

    def _audit(
        self, actor: str, action: str, target: str, details: dict[str, JSONValue], now: datetime
    ) -> None:
        self._conn.execute(
            "INSERT INTO audit_log (at, actor, action, target, details) VALUES (?, ?, ?, ?, ?)",
            (ts(now), actor, action, target, json.dumps(details, ensure_ascii=False, sort_keys=True)),
        )

    # ---- findings ---------------------------------------------------------------------------

    def record_findings(
        self,
        findings: Iterable[Finding],
        *,
        now: datetime,
        approvals: Sequence[Approval] | None = None,
        not_before: datetime | None = None,
    ) -> RecordResult:
        """Add findings, or add their new evidence to the finding with the same fingerprint.

        An existing finding keeps its review: a dismissed one stays dismissed. A new one is
        `approved` when an approval covers its rule and subject at the time it was seen. Findings
        last seen before `not_before` (the retention horizon) are not recorded at all.
        """
        approvals = list(approvals) if approvals is not None else self.list_approvals()
        new_ids: list[int] = []
        updated = 0
        with self.transaction():
            for f in findings:
                if not_before is not None and f.last_seen < not_before:
                    continue
                row = self._conn.execute(
                    "SELECT id, status, approval_id FROM findings WHERE fingerprint = ?",
                    (f.fingerprint,),
                ).fetchone()
                if row is None:
                    new_ids.append(self._insert_finding(f, now, approvals))
                    continue
                fid, status, approval_id = row
                added = self._add_evidence(fid, f.evidence)
                if not added:
                    self._conn.execute(  # the same observations, perhaps seen for longer
                        "UPDATE findings SET last_seen = max(last_seen, ?) WHERE id = ?",
                        (ts(f.last_seen), fid),
                    )
                    continue
                updated += 1
                status, approval_id = self._status_after_new_evidence(
                    f, Status(status), approval_id, approvals
                )
                self._conn.execute(
                    """UPDATE findings SET occurrences = occurrences + ?, first_seen = min(first_seen, ?),
                       last_seen = max(last_seen, ?), status = ?, approval_id = ?, updated_at = ?,
                       pupil_involved = max(pupil_involved, ?) WHERE id = ?""",
                    (
                        added,
                        ts(f.first_seen),
                        ts(f.last_seen),
                        status.value,
                        approval_id,
                        ts(now),
                        int(f.pupil_involved),
                        fid,
                    ),
                )
        return RecordResult(new=len(new_ids), updated=updated, new_ids=tuple(new_ids))

    @staticmethod
    def _covering(f: Finding, approvals: Sequence[Approval]) -> Approval | None:
        for a in approvals:
            if all(a.covers(f.rule, f.subject, e.observed_at) for e in f.evidence) and a.covers(
                f.rule, f.subject, f.first_seen
            ):
                return a
        return None

    def _status_after_new_evidence(
        self, f: Finding, status: Status, approval_id: int | None, approvals: Sequence[Approval]
    ) -> tuple[Status, int | None]:
        """An approved finding seen again outside its approval is open again; reviews stay."""
        if status != Status.APPROVED:
            return status, approval_id
        covering = self._covering(f, approvals)
        if covering is not None:
            return Status.APPROVED, approval_id
        return Status.OPEN, None

    def _insert_finding(self, f: Finding, now: datetime, approvals: Sequence[Approval]) -> int:
        covering = self._covering(f, approvals)
        status = Status.APPROVED if covering else Status.OPEN
        s = f.subject
        cur = self._conn.execute(
            """INSERT INTO findings (fingerprint, rule, clauses, severity, status, staff, address, room,
                 device, service, first_seen, last_seen, occurrences, pupil_involved, approval_id, reasons,
                 created_at, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)""",
            (
                f.fingerprint,
                f.rule,
                json.dumps(list(f.clauses)),
                f.severity.value,
                status.value,
                s.staff,
                s.address,
                s.room,
                s.device,
                s.service,
                ts(f.first_seen),
                ts(f.last_seen),
                int(f.pupil_involved),
                covering.id if covering else None,
                json.dumps(list(f.reasons), ensure_ascii=False),
                ts(now),
                ts(now),
            ),
        )
        fid = int(cur.lastrowid or 0)
        added = self._add_evidence(fid, f.evidence)
        self._conn.execute("UPDATE findings SET occurrences = ? WHERE id = ?", (max(added, 1), fid))
        return fid

    def _add_evidence(self, fid: int, evidence: Iterable[Evidence]) -> int:
        """Add evidence not yet held; returns how many were new.

        Evidence already held under the same key is brought up to date (a session seen longer
        on a later scan keeps its key, its start, and gets its new end and bytes).
        """
        added = 0
        for e in evidence:
            data = json.dumps(dict(e.data), ensure_ascii=False, sort_keys=True)
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO evidence (finding_id, key, observed_at, data) VALUES (?, ?, ?, ?)",
                (fid, e.key, ts(e.observed_at), data),
            )
            if cur.rowcount:
                added += 1
            else:
                self._conn.execute(
                    "UPDATE evidence SET data = ? WHERE finding_id = ? AND key = ? AND data != ?",
                    (data, fid, e.key, data),
                )
        return added

    _FINDING_COLUMNS = (
        "id, rule, clauses, severity, status, staff, address, room, device, service, fingerprint, "
        "first_seen, last_seen, occurrences, pupil_involved, approval_id, reasons, created_at, "
        "reviewed_by, review_note"
    )

    def list_findings(
        self,
        *,
        since: datetime | None = None,
        rule: str | None = None,
        status: Status | None = None,
        subject: Subject | None = None,
        created_since: datetime | None = None,
        created_before: datetime | None = None,
        ids: Sequence[int] | None = None,
        with_evidence: bool = False,
        limit: int | None = None,
    ) -> list[StoredFinding]:
        return list(
            self.iter_findings(
                since=since,
                rule=rule,
                status=status,
                subject=subject,
                created_since=created_since,
                created_before=created_before,
                ids=ids,
                with_evidence=with_evidence,
                limit=limit,
            )
        )

    def iter_findings(
        self,
        *,
        since: datetime | None = None,
        rule: str | None = None,
        status: Status | None = None,
        subject: Subject | None = None,
        created_since: datetime | None = None,
        created_before: datetime | None = None,
        ids: Sequence[int] | None = None,
        with_evidence: bool = False,
        limit: int | None = None,
        pupil_only: bool = False,
        chunk: int = 500,
    ) -> Iterator[StoredFinding]:
        """Findings in id order, read a chunk at a time: memory stays flat however many there are."""
        where: list[str] = []
        args: list[Any] = []
        for clause, value in (
            ("last_seen >= ?", None if since is None else ts(since)),
            ("created_at >= ?", None if created_since is None else ts(created_since)),
            ("created_at < ?", None if created_before is None else ts(created_before)),
            ("rule = ?", rule),
            ("status = ?", None if status is None else status.value),
        ):
            if value is not None:
                where.append(clause)
                args.append(value)
        if subject is not None:
            for part, value in subject.as_dict().items():
                where.append(f"{part} = ? COLLATE NOCASE")
                args.append(value)
        if ids is not None:
            where.append(f"id IN ({','.join('?' * len(ids))})")
            args.extend(ids)
        if pupil_only:
            where.append("pupil_involved = 1")
        remaining = limit
        after = 0
        while remaining is None or remaining > 0:
            size = chunk if remaining is None else min(chunk, remaining)
            sql = f"SELECT {self._FINDING_COLUMNS} FROM findings WHERE " + " AND ".join([*where, "id > ?"])
            rows = self._conn.execute(sql + f" ORDER BY id LIMIT {size}", [*args, after]).fetchall()
            if not rows:
                return
            found = [self._finding_row(r) for r in rows]
            if with_evidence:
                evidence = self._evidence_for([f.id for f in found])
                found = [_with_evidence(f, evidence.get(f.id, ())) for f in found]
            yield from found
            after = found[-1].id
            if remaining is not None:
                remaining -= len(found)

    def count_findings_where(
        self,
        *,
        status: Status | None = None,
        created_before: datetime | None = None,
        pupil_only: bool = False,
    ) -> int:
        sql, args = "SELECT count(*) FROM findings WHERE 1", []
        if status is not None:
            sql += " AND status = ?"
            args.append(status.value)
        if created_before is not None:
            sql += " AND created_at < ?"
            args.append(ts(created_before))
        if pupil_only:
            sql += " AND pupil_involved = 1"
        return int(self._conn.execute(sql, args).fetchone()[0])

    def count_findings(self, *, pupil_only: bool = False) -> dict[str, int]:
        """How many findings there are in each status."""
        where = " WHERE pupil_involved = 1" if pupil_only else ""
        rows = self._conn.execute(f"SELECT status, count(*) FROM findings{where} GROUP BY status")
        return {status: int(n) for status, n in rows}

    def created_times(self, *, since: datetime, pupil_only: bool = False) -> list[datetime]:
        """When each finding recorded since `since` was recorded (the digest's day-by-day chart)."""
        pupil = " AND pupil_involved = 1" if pupil_only else ""
        rows = self._conn.execute(
            f"SELECT created_at FROM findings WHERE created_at >= ?{pupil}", (ts(since),)
        )
        return [parse_ts(t) for (t,) in rows]

    def get_finding(self, fid: int) -> StoredFinding:
        found = self.list_findings(ids=[fid], with_evidence=True)
        if not found:
            raise UsageError(f"no finding #{fid}")
        return found[0]

    def _evidence_for(self, ids: list[int]) -> dict[int, tuple[Evidence, ...]]:
        out: dict[int, list[Evidence]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows = self._conn.execute(
                f"SELECT finding_id, key, observed_at, data FROM evidence WHERE finding_id IN "
                f"({','.join('?' * len(chunk))}) ORDER BY observed_at, id",
                chunk,
            )
            for fid, key, observed, data in rows:
                out.setdefault(fid, []).append(Evidence(key, parse_ts(observed), json.loads(data)))
        return {k: tuple(v) for k, v in out.items()}

    @staticmethod
    def _finding_row(r: sqlite3.Row | tuple[Any, ...]) -> StoredFinding:
        (
            fid,
            rule,
            clauses,
            severity,
            status,
            staff,
            address,
            room,
            device,
            service,
            fingerprint,
            first_seen,
            last_seen,
            occurrences,
            pupil,
            approval_id,
            reasons,
            created_at,
            reviewed_by,
            review_note,
        ) = r
        return StoredFinding(
            id=fid,
            rule=rule,
            clauses=tuple(json.loads(clauses)),
            severity=Severity(severity),
            status=Status(status),
            subject=Subject(staff, address, room, device, service),
            fingerprint=fingerprint,
            first_seen=parse_ts(first_seen),
            last_seen=parse_ts(last_seen),
            occurrences=occurrences,
            pupil_involved=bool(pupil),
            approval_id=approval_id,
            reasons=tuple(json.loads(reasons)),
            created_at=parse_ts(created_at),
            reviewed_by=reviewed_by,
            review_note=review_note,
        )

    def review(self, fid: int, status: Status, *, by: str, note: str | None, now: datetime) -> StoredFinding:
        """Confirm or dismiss a finding after a person looked at it; audited."""
        if status not in (Status.CONFIRMED, Status.DISMISSED):
            raise UsageError(f"a review confirms or dismisses, not {status.value}")
        with self.transaction():
            row = self._conn.execute("SELECT status FROM findings WHERE id = ?", (fid,)).fetchone()
            if row is None:
                raise UsageError(f"no finding #{fid}")
            self._conn.execute(
                "UPDATE findings SET status = ?, reviewed_by = ?, reviewed_at = ?, review_note = ?, "
                "updated_at = ? WHERE id = ?",
                (status.value, by, ts(now), note, ts(now), fid),
            )
            self._audit(
                by,
                f"finding.{'confirm' if status == Status.CONFIRMED else 'dismiss'}",
                f"finding:{fid}",
                {"from": row[0], "to": status.value, "note": note},
                now,
            )
        return self.get_finding(fid)

    # ---- approvals --------------------------------------------------------------------------

    def grant_approval(
        self,
        *,
        rule: str,
        subject: Subject,
        valid_from: datetime,
        valid_until: datetime,
        approved_by: str,
        reason: str,
        now: datetime,
    ) -> tuple[Approval, int]:
        """Record an approval and approve the open findings it covers; returns it and that count.

        It never reaches back before `valid_from`: only findings whose every occurrence falls in
        the approved period change.
        """
        if not subject.as_dict():
            raise UsageError("an approval needs a subject")
        if valid_until <= valid_from:
            raise UsageError("--until must be after --from")
        with self.transaction():
            s = subject
            cur = self._conn.execute(
                """INSERT INTO approvals (rule, staff, address, room, device, service, valid_from,
                     valid_until, approved_by, reason, granted_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    rule,
                    s.staff,
                    s.address,
                    s.room,
                    s.device,
                    s.service,
                    ts(valid_from),
                    ts(valid_until),
                    approved_by,
                    reason,
                    ts(now),
                ),
            )
            approval = self.get_approval(int(cur.lastrowid or 0))
            changed = 0
            for f in self.list_findings(rule=rule, status=Status.OPEN, subject=subject, with_evidence=True):
                if all(
                    approval.covers(rule, f.subject, e.observed_at) for e in f.evidence
                ) and approval.covers(rule, f.subject, f.first_seen):
                    self._conn.execute(
                        "UPDATE findings SET status = 'approved', approval_id = ?, updated_at = ? "
                        "WHERE id = ?",
                        (approval.id, ts(now), f.id),
                    )
                    changed += 1
            self._audit(
                approved_by,
                "approval.grant",
                f"approval:{approval.id}",
                {
                    "rule": rule,
                    "subject": dict(subject.as_dict()),
                    "valid_from": ts(valid_from),
                    "valid_until": ts(valid_until),
                    "reason": reason,
                    "findings_approved": changed,
                },
                now,
            )
        return approval, changed

    def revoke_approval(self, aid: int, *, by: str, reason: str, now: datetime) -> tuple[Approval, int]:
        """End an approval now. What it covered before now stays approved; later findings reopen."""
        with self.transaction():
            a = self.get_approval(aid)
            if a.revoked_at is not None:
                raise UsageError(f"approval #{aid} was already revoked on {a.revoked_at:%Y-%m-%d %H:%M}")
            self._conn.execute(
                "UPDATE approvals SET revoked_at = ?, revoked_by = ?, revoke_reason = ? WHERE id = ?",
                (ts(now), by, reason, aid),
            )
            cur = self._conn.execute(
                "UPDATE findings SET status = 'open', approval_id = NULL, updated_at = ? "
                "WHERE approval_id = ? AND status = 'approved' AND last_seen >= ?",
                (ts(now), aid, ts(now)),
            )
            reopened = cur.rowcount
            self._audit(
                by,
                "approval.revoke",
                f"approval:{aid}",
                {"reason": reason, "findings_reopened": reopened},
                now,
            )
        return self.get_approval(aid), reopened

    def get_approval(self, aid: int) -> Approval:
        row = self._conn.execute(
            f"SELECT {self._APPROVAL_COLUMNS} FROM approvals WHERE id = ?", (aid,)
        ).fetchone()
        if row is None:
            raise UsageError(f"no approval #{aid}")
        return self._approval_row(row)

    _APPROVAL_COLUMNS = (
        "id, rule, staff, address, room, device, service, valid_from, valid_until, approved_by, reason, "
        "granted_at, revoked_at, revoked_by, revoke_reason"
    )

    def list_approvals(self, *, active_at: datetime | None = None) -> list[Approval]:
        rows = self._conn.execute(f"SELECT {self._APPROVAL_COLUMNS} FROM approvals ORDER BY id")
        approvals = [self._approval_row(r) for r in rows]
        if active_at is not None:
            approvals = [a for a in approvals if a.is_active(active_at)]
        return approvals

    @staticmethod
    def _approval_row(r: tuple[Any, ...]) -> Approval:
        (
            aid,
            rule,
            staff,
            address,
            room,
            device,
            service,
            valid_from,
            valid_until,
            approved_by,
            reason,
            granted_at,
            revoked_at,
            revoked_by,
            revoke_reason,
        ) = r
        return Approval(
            id=aid,
            rule=rule,
            subject=Subject(staff, address, room, device, service),
            valid_from=parse_ts(valid_from),
            valid_until=parse_ts(valid_until),
            approved_by=approved_by,
            reason=reason,
            granted_at=parse_ts(granted_at),
            revoked_at=_opt_ts(revoked_at),
            revoked_by=revoked_by,
            revoke_reason=revoke_reason,
        )

    def approval_usage(self, *, pupil_only: bool = False) -> dict[int, int]:
        """How many findings each approval covers (the digest shows what each approval covered)."""
        pupil = " AND pupil_involved = 1" if pupil_only else ""
        rows = self._conn.execute(
            f"SELECT approval_id, count(*) FROM findings WHERE approval_id IS NOT NULL{pupil} "
            "GROUP BY approval_id"
        )
        return {int(a): int(n) for a, n in rows}

    # ---- audit log --------------------------------------------------------------------------

    def audit(
        self, actor: str, action: str, target: str, details: dict[str, JSONValue], *, now: datetime
    ) -> None:
        """Write one entry to the audit log (for changes made outside this class, e.g. users)."""
        with self.transaction():
            self._audit(actor, action, target, details, now)

    def list_audit(self, *, since: datetime | None = None, limit: int | None = None) -> list[AuditEntry]:
        sql = "SELECT id, at, actor, action, target, details FROM audit_log"
        args: list[Any] = []
        if since is not None:
            sql += " WHERE at >= ?"
            args.append(ts(since))
        sql += " ORDER BY id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [
            AuditEntry(i, parse_ts(at), actor, action, target, json.loads(details))
            for i, at, actor, action, target, details in self._conn.execute(sql, args)
        ]

    # ---- checkpoints and runs ---------------------------------------------------------------

    def get_checkpoint(self, source: str, key: str) -> str | None:
        row = self._conn.execute(
            "SELECT value FROM checkpoints WHERE source = ? AND key = ?", (source, key)
        ).fetchone()
        return None if row is None else str(row[0])

    def get_checkpoints(self, source: str) -> dict[str, str]:
        rows = self._conn.execute("SELECT key, value FROM checkpoints WHERE source = ?", (source,))
        return {str(k): str(v) for k, v in rows}

    def set_checkpoint(self, source: str, key: str, value: str, now: datetime) -> None:
        with self.transaction():
            self._conn.execute(
                """INSERT INTO checkpoints (source, key, value, updated_at) VALUES (?, ?, ?, ?)
                   ON CONFLICT (source, key)
                   DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at""",
                (source, key, value, ts(now)),
            )

    def forget_checkpoint(self, source: str, key: str) -> None:
        with self.transaction():
            self._conn.execute("DELETE FROM checkpoints WHERE source = ? AND key = ?", (source, key))

    # ---- recent network observations ------------------------------------------------------

    def remember_observations(self, source: str, observations: Iterable[NetObservation]) -> None:
        """Keep streaming observations for the next scan's sessions (idempotent)."""
        with self.transaction():
            self._conn.executemany(
                """INSERT OR IGNORE INTO net_recent (source, client, server, host, via, service, category,
                     ts, first_seen, last_seen, bytes, flow) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [
                    (
                        source,
                        o.client,
                        o.server,
                        o.host,
                        o.via,
                        o.service,
                        o.category,
                        ts(o.ts),
                        None if o.first_seen is None else ts(o.first_seen),
                        None if o.last_seen is None else ts(o.last_seen),
                        o.bytes,
                        o.flow or "",
                    )
                    for o in observations
                ],
            )

    def recent_observations(self, source: str, *, since: datetime) -> list[NetObservation]:
        rows = self._conn.execute(
            """SELECT client, server, host, via, service, category, ts, first_seen, last_seen, bytes, flow
               FROM net_recent WHERE source = ? AND coalesce(last_seen, ts) >= ? ORDER BY ts, id""",
            (source, ts(since)),
        )
        return [
            NetObservation(
                source=source,
                client=c,
                server=srv,
                host=h,
                via=v,
                service=svc,
                category=cat,
                ts=parse_ts(t),
                first_seen=_opt_ts(fs),
                last_seen=_opt_ts(ls),
                bytes=b,
                flow=fl or None,
            )
            for c, srv, h, v, svc, cat, t, fs, ls, b, fl in rows
        ]

    def forget_observations(self, source: str, *, before: datetime) -> int:
        with self.transaction():
            cur = self._conn.execute(
                "DELETE FROM net_recent WHERE source = ? AND coalesce(last_seen, ts) < ?",
                (source, ts(before)),
            )
        return cur.rowcount

    def start_run(self, source: str, kind: str, now: datetime) -> int:
        with self.transaction():
            cur = self._conn.execute(
                "INSERT INTO runs (source, kind, started_at, status) VALUES (?, ?, ?, 'running')",
                (source, kind, ts(now)),
            )
        return int(cur.lastrowid or 0)

    def finish_run(
        self,
        run_id: int,
        *,
        status: str,
        items: int,
        skipped: int,
        findings: int,
        error: str | None,
        now: datetime,
    ) -> None:
        with self.transaction():
            self._conn.execute(
                "UPDATE runs SET finished_at = ?, status = ?, items = ?, skipped = ?, findings = ?, "
                "error = ? WHERE id = ?",
                (ts(now), status, items, skipped, findings, error, run_id),
            )

    _RUN_COLUMNS = "id, source, kind, started_at, finished_at, status, items, skipped, findings, error"

    def last_runs(self) -> list[RunRecord]:
        """The latest run of every source, by source name."""
        rows = self._conn.execute(
            f"SELECT {self._RUN_COLUMNS} FROM runs WHERE id IN (SELECT max(id) FROM runs GROUP BY source) "
            "ORDER BY source"
        )
        return [self._run_row(r) for r in rows]

    def last_success(self, source: str) -> RunRecord | None:
        row = self._conn.execute(
            f"SELECT {self._RUN_COLUMNS} FROM runs WHERE source = ? AND status = 'ok' "
            "ORDER BY id DESC LIMIT 1",
            (source,),
        ).fetchone()
        return None if row is None else self._run_row(row)

    def list_runs(self, *, since: datetime | None = None) -> list[RunRecord]:
        sql = f"SELECT {self._RUN_COLUMNS} FROM runs"
        args: list[Any] = []
        if since is not None:
            sql += " WHERE started_at >= ?"
            args.append(ts(since))
        return [self._run_row(r) for r in self._conn.execute(sql + " ORDER BY id", args)]

    @staticmethod
    def _run_row(r: tuple[Any, ...]) -> RunRecord:
        rid, source, kind, started, finished, status, items, skipped, findings, error = r
        return RunRecord(
            rid, source, kind, parse_ts(started), _opt_ts(finished), status, items, skipped, findings, error
        )

    # ---- digests ----------------------------------------------------------------------------

    def digest_record(self, day: str, recipient: str) -> DigestRecord | None:
        row = self._conn.execute(
            "SELECT day, recipient, status, attempts, last_error, message_id, sent_at FROM digests "
            "WHERE day = ? AND recipient = ?",
            (day, recipient),
        ).fetchone()
        if row is None:
            return None
        d, r, status, attempts, err, mid, sent = row
        return DigestRecord(d, r, status, attempts, err, mid, _opt_ts(sent))

    def mark_digest(
        self,
        day: str,
        recipient: str,
        *,
        status: str,
        now: datetime,
        error: str | None = None,
        message_id: str | None = None,
    ) -> None:
        """Record a digest attempt: pending before sending, then sent or failed."""
        with self.transaction():
            self._conn.execute(
                """INSERT INTO digests
                     (day, recipient, status, attempts, last_error, message_id, created_at, sent_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (day, recipient) DO UPDATE SET status = excluded.status,
                     attempts = digests.attempts + excluded.attempts, last_error = excluded.last_error,
                     message_id = coalesce(excluded.message_id, digests.message_id),
                     sent_at = coalesce(excluded.sent_at, digests.sent_at)""",
                (
                    day,
                    recipient,
                    status,
                    1 if status in ("sent", "failed") else 0,
                    error,
                    message_id,
                    ts(now),
                    ts(now) if status == "sent" else None,
                ),
            )

    def last_digest_day(self) -> str | None:
        row = self._conn.execute("SELECT max(day) FROM digests WHERE status = 'sent'").fetchone()
        return None if row is None or row[0] is None else str(row[0])

    # ---- retention --------------------------------------------------------------------------

    def purge(
        self,
        *,
        before: datetime,
        now: datetime,
        audit_before: datetime | None = None,
        actor: str = "retention",
    ) -> PurgeResult:
        """Delete findings (with their evidence), runs and checkpoints older than `before`.

        Audit entries are kept unless `audit_before` is given (the audit retention). The purge
        itself is written to the audit log.
        """
        cutoff = ts(before)
        with self.transaction():
            findings = self._conn.execute("DELETE FROM findings WHERE last_seen < ?", (cutoff,)).rowcount
            runs = self._conn.execute(
                "DELETE FROM runs WHERE started_at < ? "
                "AND id NOT IN (SELECT max(id) FROM runs GROUP BY source)",
                (cutoff,),
            ).rowcount
            checkpoints = self._conn.execute(
                "DELETE FROM checkpoints WHERE updated_at < ?", (cutoff,)
            ).rowcount
            self._conn.execute("DELETE FROM digests WHERE created_at < ?", (cutoff,))
            self._conn.execute("DELETE FROM net_recent WHERE ts < ?", (cutoff,))
            audit = 0
            if audit_before is not None:
                audit = self._conn.execute("DELETE FROM audit_log WHERE at < ?", (ts(audit_before),)).rowcount
            self._audit(
                actor,
                "retention.purge",
                "store",
                {
                    "before": cutoff,
                    "findings": findings,
                    "runs": runs,
                    "checkpoints": checkpoints,
                    "audit": audit,
                },
                now,
            )
        return PurgeResult(findings, runs, checkpoints, audit)

    # ---- digests archive (read) -------------------------------------------------------------

    def list_digest_records(self) -> list[DigestRecord]:
        """Every digest record, newest day first (the console's digests page)."""
        rows = self._conn.execute(
            "SELECT day, recipient, status, attempts, last_error, message_id, sent_at FROM digests "
            "ORDER BY day DESC, recipient"
        )
        return [DigestRecord(d, r, st, n, err, mid, _opt_ts(sent)) for d, r, st, n, err, mid, sent in rows]

    # ---- console users and sessions ---------------------------------------------------------

    _USER_COLUMNS = "email, role, password_hash, created_at, failed_attempts, locked_until, last_signin"

    def add_user(self, email: str, role: str, password_hash: str | None, *, by: str, now: datetime) -> None:
        """Add a console account; audited. An existing account is an error, not a silent change."""
        email = email.strip().lower()
        with self.transaction():
            if self.get_user(email) is not None:
                raise UsageError(f"user {email} already exists (remove it first to change it)")
            self._conn.execute(
                "INSERT INTO users (email, role, password_hash, created_at) VALUES (?, ?, ?, ?)",
                (email, role, password_hash, ts(now)),
            )
            self._audit(by, "user.add", f"user:{email}", {"role": role}, now)

    def remove_user(self, email: str, *, by: str, now: datetime) -> None:
        """Remove an account and end its sessions; audited."""
        email = email.strip().lower()
        with self.transaction():
            if self.get_user(email) is None:
                raise UsageError(f"no user {email}")
            self._conn.execute("DELETE FROM sessions WHERE email = ?", (email,))
            self._conn.execute("DELETE FROM users WHERE email = ?", (email,))
            self._audit(by, "user.remove", f"user:{email}", {}, now)

    def get_user(self, email: str) -> UserRecord | None:
        row = self._conn.execute(
            f"SELECT {self._USER_COLUMNS} FROM users WHERE email = ?", (email.strip().lower(),)
        ).fetchone()
        return None if row is None else _user_row(row)

    def list_users(self) -> list[UserRecord]:
        return [
            _user_row(r) for r in self._conn.execute(f"SELECT {self._USER_COLUMNS} FROM users ORDER BY email")
        ]

    def set_signin_state(
        self,
        email: str,
        *,
        failed_attempts: int,
        locked_until: datetime | None,
        signed_in_at: datetime | None = None,
    ) -> None:
        """Record the outcome of a sign-in: the failure count, the lock, the last success."""
        with self.transaction():
            self._conn.execute(
                "UPDATE users SET failed_attempts = ?, locked_until = ?, "
                "last_signin = coalesce(?, last_signin) WHERE email = ?",
                (
                    failed_attempts,
                    None if locked_until is None else ts(locked_until),
                    None if signed_in_at is None else ts(signed_in_at),
                    email.strip().lower(),
                ),
            )

    def create_session(self, sid: str, email: str, csrf: str, *, expires_at: datetime, now: datetime) -> None:
        """A console session, stored by the hash of its token; expired ones are dropped here too."""
        with self.transaction():
            self._conn.execute("DELETE FROM sessions WHERE expires_at < ?", (ts(now),))
            self._conn.execute(
                "INSERT INTO sessions (id, email, csrf, created_at, expires_at, last_seen) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (sid, email.strip().lower(), csrf, ts(now), ts(expires_at), ts(now)),
            )

    def get_session(self, sid: str, *, now: datetime) -> SessionRecord | None:
        """The live session with this id and its user, or None (unknown, expired or user removed)."""
        row = self._conn.execute(
            "SELECT s.id, s.email, u.role, s.csrf, s.created_at, s.expires_at FROM sessions s "
            "JOIN users u ON u.email = s.email WHERE s.id = ? AND s.expires_at > ?",
            (sid, ts(now)),
        ).fetchone()
        if row is None:
            return None
        i, email, role, csrf, created, expires = row
        return SessionRecord(i, email, role, csrf, parse_ts(created), parse_ts(expires))

    def touch_session(self, sid: str, *, expires_at: datetime, now: datetime) -> None:
        with self.transaction():
            self._conn.execute(
                "UPDATE sessions SET expires_at = ?, last_seen = ? WHERE id = ?",
                (ts(expires_at), ts(now), sid),
            )

    def delete_session(self, sid: str) -> None:
        with self.transaction():
            self._conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))

    def console_key(self, name: str) -> bytes:
        """A random 32-byte key kept in the store (pseudonyms, sign-in tokens), made on first use."""
        with self.transaction():
            self._conn.execute(
                "INSERT OR IGNORE INTO console_keys (name, value) VALUES (?, ?)", (name, os.urandom(32))
            )
            row = self._conn.execute("SELECT value FROM console_keys WHERE name = ?", (name,)).fetchone()
        return bytes(row[0])


@dataclass(frozen=True)
class UserRecord:
    """A console account. `password_hash` is None for accounts that sign in through a proxy only."""

    email: str
    role: str
    password_hash: str | None
    created_at: datetime
    failed_attempts: int
    locked_until: datetime | None
    last_signin: datetime | None


@dataclass(frozen=True)
class SessionRecord:
    id: str
    email: str
    role: str
    csrf: str
    created_at: datetime
    expires_at: datetime


def _user_row(r: tuple[Any, ...]) -> UserRecord:
    email, role, pw, created, failed, locked, last = r
    return UserRecord(email, role, pw, parse_ts(created), int(failed), _opt_ts(locked), _opt_ts(last))


def _with_evidence(f: StoredFinding, evidence: tuple[Evidence, ...]) -> StoredFinding:
    from dataclasses import replace

    return replace(f, evidence=evidence)


def _statements(script: str) -> Iterator[str]:
    """Split a migration script into statements; a trigger's body keeps its own semicolons."""
    buf: list[str] = []
    for line in script.strip().splitlines():
        buf.append(line)
        text = "\n".join(buf).strip()
        if text.endswith(";") and sqlite3.complete_statement(text):
            yield text
            buf = []
    rest = "\n".join(buf).strip()
    if rest:
        yield rest
