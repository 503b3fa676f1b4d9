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
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from auditd.config import Config

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
    # 4: sites. Every record carries the site whose daemon wrote it ('' when there is only one);
    # fingerprints, checkpoints, digests and recent observations are unique per site, so the
    # tables holding those constraints are rebuilt (SQLite cannot alter a constraint). Files of a
    # shared log folder are claimed here, so several daemons ingest each one once.
    """
    CREATE TABLE findings_v4 (
        id INTEGER PRIMARY KEY,
        site TEXT NOT NULL DEFAULT '',
        fingerprint TEXT NOT NULL,
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
        reviewed_by TEXT, reviewed_at TEXT, review_note TEXT,
        UNIQUE (site, fingerprint)
    );
    INSERT INTO findings_v4 (id, fingerprint, rule, clauses, severity, status, staff, address, room, device,
        service, first_seen, last_seen, occurrences, pupil_involved, approval_id, reasons, created_at,
        updated_at, reviewed_by, reviewed_at, review_note)
    SELECT id, fingerprint, rule, clauses, severity, status, staff, address, room, device, service,
        first_seen, last_seen, occurrences, pupil_involved, approval_id, reasons, created_at, updated_at,
        reviewed_by, reviewed_at, review_note FROM findings;
    DROP TABLE findings;
    ALTER TABLE findings_v4 RENAME TO findings;
    CREATE INDEX findings_created ON findings(created_at);
    CREATE INDEX findings_last_seen ON findings(last_seen);
    CREATE INDEX findings_rule_status ON findings(rule, status);
    CREATE INDEX findings_staff ON findings(staff COLLATE NOCASE);
    CREATE INDEX findings_site_created ON findings(site, created_at);
    CREATE INDEX findings_site_last_seen ON findings(site, last_seen);
    CREATE INDEX findings_approval ON findings(approval_id);
    CREATE INDEX evidence_finding ON evidence(finding_id);
    ALTER TABLE approvals ADD COLUMN site TEXT NOT NULL DEFAULT '';
    ALTER TABLE audit_log ADD COLUMN site TEXT NOT NULL DEFAULT '';
    ALTER TABLE runs ADD COLUMN site TEXT NOT NULL DEFAULT '';
    CREATE INDEX runs_site_source ON runs(site, source, id);
    ALTER TABLE users ADD COLUMN site TEXT NOT NULL DEFAULT '';
    CREATE TABLE checkpoints_v4 (
        site TEXT NOT NULL DEFAULT '',
        source TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (site, source, key)
    );
    INSERT INTO checkpoints_v4 (source, key, value, updated_at) SELECT source, key, value, updated_at
        FROM checkpoints;
    DROP TABLE checkpoints;
    ALTER TABLE checkpoints_v4 RENAME TO checkpoints;
    CREATE TABLE digests_v4 (
        site TEXT NOT NULL DEFAULT '',
        day TEXT NOT NULL,
        recipient TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        message_id TEXT,
        created_at TEXT NOT NULL,
        sent_at TEXT,
        PRIMARY KEY (site, day, recipient)
    );
    INSERT INTO digests_v4 (day, recipient, status, attempts, last_error, message_id, created_at, sent_at)
        SELECT day, recipient, status, attempts, last_error, message_id, created_at, sent_at FROM digests;
    DROP TABLE digests;
    ALTER TABLE digests_v4 RENAME TO digests;
    CREATE TABLE net_recent_v4 (
        id INTEGER PRIMARY KEY,
        site TEXT NOT NULL DEFAULT '',
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
        UNIQUE (site, source, client, server, host, via, ts, flow)
    );
    INSERT INTO net_recent_v4 (id, source, client, server, host, via, service, category, ts, first_seen,
        last_seen, bytes, flow)
    SELECT id, source, client, server, host, via, service, category, ts, first_seen, last_seen, bytes, flow
        FROM net_recent;
    DROP TABLE net_recent;
    ALTER TABLE net_recent_v4 RENAME TO net_recent;
    CREATE INDEX net_recent_source_ts ON net_recent(site, source, ts);
    CREATE TABLE ingested_files (
        identity TEXT PRIMARY KEY,
        site TEXT NOT NULL,
        source TEXT NOT NULL,
        path TEXT NOT NULL,
        owner TEXT NOT NULL,
        claimed_at TEXT NOT NULL,
        done_at TEXT
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

# The same migrations for PostgreSQL, numbered alike (the version is kept in `schema_version`).
# Times stay fixed-width ISO text, as in SQLite, so both backends sort and compare them the same.
PG_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE approvals (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
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
    CREATE TABLE findings (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        fingerprint TEXT NOT NULL CONSTRAINT findings_fingerprint_key UNIQUE,
        rule TEXT NOT NULL,
        clauses TEXT NOT NULL,
        severity TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('open', 'approved', 'confirmed', 'dismissed')),
        staff TEXT, address TEXT, room TEXT, device TEXT, service TEXT,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        occurrences INTEGER NOT NULL DEFAULT 1,
        pupil_involved INTEGER NOT NULL DEFAULT 0,
        approval_id BIGINT REFERENCES approvals(id),
        reasons TEXT NOT NULL DEFAULT '[]',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        reviewed_by TEXT, reviewed_at TEXT, review_note TEXT
    );
    CREATE INDEX findings_created ON findings(created_at);
    CREATE INDEX findings_last_seen ON findings(last_seen);
    CREATE INDEX findings_rule_status ON findings(rule, status);
    CREATE INDEX findings_staff ON findings(lower(staff));
    CREATE TABLE evidence (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        finding_id BIGINT NOT NULL REFERENCES findings(id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        observed_at TEXT NOT NULL,
        data TEXT NOT NULL,
        UNIQUE (finding_id, key)
    );
    CREATE TABLE audit_log (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        details TEXT NOT NULL DEFAULT '{}'
    );
    CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
    CREATE TRIGGER audit_log_append_only BEFORE UPDATE ON audit_log
        FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
    CREATE TABLE checkpoints (
        source TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        CONSTRAINT checkpoints_pkey PRIMARY KEY (source, key)
    );
    CREATE TABLE runs (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
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
        CONSTRAINT digests_pkey PRIMARY KEY (day, recipient)
    );
    """,
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
        value BYTEA NOT NULL
    );
    """,
    """
    CREATE TABLE net_recent (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
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
        bytes BIGINT,
        flow TEXT NOT NULL DEFAULT '',
        CONSTRAINT net_recent_key UNIQUE (source, client, server, host, via, ts, flow)
    );
    CREATE INDEX net_recent_source_ts ON net_recent(source, ts);
    """,
    """
    ALTER TABLE findings ADD COLUMN site TEXT NOT NULL DEFAULT '';
    ALTER TABLE findings DROP CONSTRAINT findings_fingerprint_key;
    ALTER TABLE findings ADD CONSTRAINT findings_site_fingerprint_key UNIQUE (site, fingerprint);
    CREATE INDEX findings_site_created ON findings(site, created_at);
    CREATE INDEX findings_site_last_seen ON findings(site, last_seen);
    CREATE INDEX findings_approval ON findings(approval_id);
    CREATE INDEX evidence_finding ON evidence(finding_id);
    ALTER TABLE approvals ADD COLUMN site TEXT NOT NULL DEFAULT '';
    ALTER TABLE audit_log ADD COLUMN site TEXT NOT NULL DEFAULT '';
    ALTER TABLE runs ADD COLUMN site TEXT NOT NULL DEFAULT '';
    CREATE INDEX runs_site_source ON runs(site, source, id);
    ALTER TABLE users ADD COLUMN site TEXT NOT NULL DEFAULT '';
    ALTER TABLE checkpoints ADD COLUMN site TEXT NOT NULL DEFAULT '';
    ALTER TABLE checkpoints DROP CONSTRAINT checkpoints_pkey;
    ALTER TABLE checkpoints ADD CONSTRAINT checkpoints_pkey PRIMARY KEY (site, source, key);
    ALTER TABLE digests ADD COLUMN site TEXT NOT NULL DEFAULT '';
    ALTER TABLE digests DROP CONSTRAINT digests_pkey;
    ALTER TABLE digests ADD CONSTRAINT digests_pkey PRIMARY KEY (site, day, recipient);
    ALTER TABLE net_recent ADD COLUMN site TEXT NOT NULL DEFAULT '';
    ALTER TABLE net_recent DROP CONSTRAINT net_recent_key;
    ALTER TABLE net_recent ADD CONSTRAINT net_recent_key
        UNIQUE (site, source, client, server, host, via, ts, flow);
    DROP INDEX net_recent_source_ts;
    CREATE INDEX net_recent_source_ts ON net_recent(site, source, ts);
    CREATE TABLE ingested_files (
        identity TEXT PRIMARY KEY,
        site TEXT NOT NULL,
        source TEXT NOT NULL,
        path TEXT NOT NULL,
        owner TEXT NOT NULL,
        claimed_at TEXT NOT NULL,
        done_at TEXT
    );
    """,
)
assert len(PG_MIGRATIONS) == SCHEMA_VERSION


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
    """A connection to the store. Use as a context manager: `with Store.open(path) as store:`.

    Two backends behind the same SQL: a SQLite file (one site, the default) and PostgreSQL (a
    trust: several sites' daemons writing at once, the console reading). The SQL is written once,
    with `?` placeholders, `ON CONFLICT`, `RETURNING` and `greatest`/`least`; `_sql` adapts it.

    `site` is the site this connection writes as (every record carries it); `scope` is what it
    reads: one site's records, or None for the whole trust. Approvals with site '' are trust-wide.
    """

    def __init__(
        self,
        path: Path,
        conn: Any,
        *,
        dialect: str = "sqlite",
        where: str | None = None,
        site: str = "",
        scope: str | None = None,
    ) -> None:
        self.path = path
        self.where = where or str(path)
        self.dialect = dialect
        self.site = site
        self.scope = scope
        self._conn = conn
        self._depth = 0
        self._errors: tuple[type[Exception], ...] = (sqlite3.Error,)
        if dialect == "postgresql":
            import psycopg

            self._errors = (psycopg.Error,)

    # ---- opening and migrating ------------------------------------------------------------

    @classmethod
    def connect(cls, config: Config, *, trust_wide: bool = False) -> Store:
        """The store a configuration names, writing as its site and reading that site's records
        (the whole trust when `trust_wide`, or when the organisation names no site)."""
        site = config.organisation.site or ""
        scope = None if trust_wide or not site else site
        sc = config.store
        if sc.url is None:
            return cls.open(sc.path, site=site, scope=scope)
        password = None
        if sc.password_file is not None:
            try:
                password = sc.password_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise StoreError(
                    f"cannot read the password file: {exc.strerror}", where=str(sc.password_file)
                ) from None
        return cls.open_postgresql(sc.url, password=password, site=site, scope=scope, path=sc.path)

    @classmethod
    def open_postgresql(
        cls,
        url: str,
        *,
        password: str | None = None,
        site: str = "",
        scope: str | None = None,
        path: Path | None = None,
    ) -> Store:
        """A PostgreSQL store; the schema is created or migrated on first connection."""
        import psycopg

        where = re.sub(r"(://[^:/@]*):[^@/]*@", r"\\1:***@", url)
        try:
            conn = psycopg.connect(url, autocommit=True, password=password, connect_timeout=30)
        except psycopg.Error as exc:
            raise StoreError(f"cannot open the store: {_first_line(exc)}", where=where) from None
        store = cls(path or Path(where), conn, dialect="postgresql", where=where, site=site, scope=scope)
        try:
            store._migrate()
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(f"cannot migrate the store: {_first_line(exc)}", where=where) from None
        return store

    @classmethod
    def open(cls, path: Path | str, *, site: str = "", scope: str | None = None) -> Store:
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
        store = cls(path, conn, site=site, scope=scope)
        try:
            store._migrate()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"not a choysez-auditd store or damaged: {exc}", where=str(path)) from None
        return store

    def _migrate(self) -> None:
        pg = self.dialect == "postgresql"
        if pg:
            # Under the migration lock: two daemons creating the table at once would collide.
            with self.transaction():
                self._conn.execute("SELECT pg_advisory_xact_lock(4242001)")
                self._conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store schema version {version} is newer than this choysez-auditd knows "
                f"({SCHEMA_VERSION}); upgrade choysez-auditd",
                where=self.where,
            )
        if version == SCHEMA_VERSION:
            return
        if pg:
            # PostgreSQL's DDL is transactional: a failed migration leaves the old schema whole.
            # Several daemons may start at once: one migrates, the others wait, then find it done.
            with self.transaction():
                self._conn.execute("SELECT pg_advisory_xact_lock(4242001)")
                version = self.schema_version
                for target in range(version, SCHEMA_VERSION):
                    self._conn.execute(PG_MIGRATIONS[target])
                    self._conn.execute("DELETE FROM schema_version")
                    self._conn.execute("INSERT INTO schema_version VALUES (%s)", (target + 1,))
            return
        if version > 0:
            self.backup(self.path.with_name(f"{self.path.name}.v{version}.bak"))
        # Rebuilding a table (migration 4) must not cascade its deletes: foreign keys are checked
        # after the migration instead, and cannot be switched inside a transaction.
        self._conn.execute("PRAGMA foreign_keys = OFF")
        try:
            for target in range(version, SCHEMA_VERSION):
                with self.transaction():
                    for statement in _statements(MIGRATIONS[target]):
                        self._conn.execute(statement)
                    if self._conn.execute("PRAGMA foreign_key_check").fetchone() is not None:
                        raise StoreError("foreign keys broken by a migration", where=self.where)
                    self._conn.execute(f"PRAGMA user_version = {target + 1}")
        finally:
            self._conn.execute("PRAGMA foreign_keys = ON")

    def backup(self, dest: Path) -> None:
        """A consistent copy of the whole store (safe while the daemon runs)."""
        if self.dialect == "postgresql":
            raise UsageError("back up a PostgreSQL store with pg_dump (see docs/scale.md)")
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
        if self.dialect == "postgresql":
            row = self._conn.execute("SELECT max(version) FROM schema_version").fetchone()
            return int(row[0] or 0)
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    # ---- the dialect ------------------------------------------------------------------------

    def _x(self, sql: str, args: Sequence[Any] = ()) -> Any:
        """Run one statement written in the common SQL; returns its cursor."""
        return self._conn.execute(_sql(self.dialect, sql), args)

    def _many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        cur = self._conn.cursor()
        cur.executemany(_sql(self.dialect, sql), list(rows))

    def _scoped(self, column: str = "site") -> tuple[str, list[Any]]:
        """The condition limiting a read to this connection's scope ('' and [] for the trust)."""
        return ("", []) if self.scope is None else (f" AND {column} = ?", [self.scope])

    def _nocase(self, column: str) -> str:
        return f"{column} = ? COLLATE NOCASE" if self.dialect == "sqlite" else f"lower({column}) = lower(?)"

    def _in_transaction(self) -> bool:
        if self.dialect == "sqlite":
            return bool(self._conn.in_transaction)
        from psycopg.pq import TransactionStatus

        return bool(self._conn.info.transaction_status != TransactionStatus.IDLE)

    # ---- transactions -----------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction; nested calls become savepoints of the outer one.

        A write the disk or the database refuses (full disk, read-only file, damage, a constraint)
        rolls the whole transaction back and becomes one StoreError naming the store: nothing
        half-written. SQLite takes the write lock at the start (BEGIN IMMEDIATE); PostgreSQL runs
        at READ COMMITTED and relies on its constraints (ON CONFLICT) where writers may meet.
        """
        try:
            if self._depth == 0:
                self._conn.execute("BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN")
            else:
                self._conn.execute(f"SAVEPOINT sp{self._depth}")
        except self._errors as exc:
            raise StoreError(f"cannot write the store: {_first_line(exc)}", where=self.where) from None
        self._depth += 1
        try:
            yield
        except BaseException as exc:
            self._depth -= 1
            self._undo()
            if isinstance(exc, self._errors):
                raise StoreError(f"cannot write the store: {_first_line(exc)}", where=self.where) from None
            raise
        else:
            self._depth -= 1
            try:
                if self._depth == 0:
                    self._conn.execute("COMMIT")
                else:
                    self._conn.execute(f"RELEASE sp{self._depth}")
            except self._errors as exc:
                self._undo()
                raise StoreError(f"cannot write the store: {_first_line(exc)}", where=self.where) from None

    def _undo(self) -> None:
        """Roll back the innermost level (SQLite may already have rolled back on a full disk)."""
        try:
            if self._depth == 0:
                if self._in_transaction():
                    self._conn.execute("ROLLBACK")
            else:
                self._conn.execute(f"ROLLBACK TO sp{self._depth}")
                self._conn.execute(f"RELEASE sp{self._depth}")
        except self._errors:
            pass  # the transaction is gone already; the store is as it was before it

    def _audit(
        self, actor: str, action: str, target: str, details: dict[str, JSONValue], now: datetime
    ) -> None:
        self._x(
            "INSERT INTO audit_log (site, at, actor, action, target, details) VALUES (?, ?, ?, ?, ?, ?)",
            (
                self.site,
                ts(now),
                actor,
                action,
                target,
                json.dumps(details, ensure_ascii=False, sort_keys=True),
            ),
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
                row = self._find(f.fingerprint)
                if row is None:
                    fid = self._insert_finding(f, now, approvals)
                    if fid is not None:
                        new_ids.append(fid)
                        continue
                    row = self._find(f.fingerprint)  # another writer of this site recorded it first
                    assert row is not None
                fid, status, approval_id = row
                added = self._add_evidence(fid, f.evidence)
                if not added:
                    self._x(  # the same observations, perhaps seen for longer
                        "UPDATE findings SET last_seen = greatest(last_seen, ?) WHERE id = ?",
                        (ts(f.last_seen), fid),
                    )
                    continue
                updated += 1
                status, approval_id = self._status_after_new_evidence(
                    f, Status(status), approval_id, approvals
                )
                self._x(
                    """UPDATE findings SET occurrences = occurrences + ?, first_seen = least(first_seen, ?),
                       last_seen = greatest(last_seen, ?), status = ?, approval_id = ?, updated_at = ?,
                       pupil_involved = greatest(pupil_involved, ?) WHERE id = ?""",
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

    def _find(self, fingerprint: str) -> tuple[int, str, int | None] | None:
        row = self._x(
            "SELECT id, status, approval_id FROM findings WHERE site = ? AND fingerprint = ?",
            (self.site, fingerprint),
        ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]), row[2])

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

    def _insert_finding(self, f: Finding, now: datetime, approvals: Sequence[Approval]) -> int | None:
        """Insert a new finding; None when a concurrent writer of the same site inserted it first."""
        covering = self._covering(f, approvals)
        status = Status.APPROVED if covering else Status.OPEN
        s = f.subject
        cur = self._x(
            """INSERT INTO findings (site, fingerprint, rule, clauses, severity, status, staff, address, room,
                 device, service, first_seen, last_seen, occurrences, pupil_involved, approval_id, reasons,
                 created_at, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)
               ON CONFLICT (site, fingerprint) DO NOTHING RETURNING id""",
            (
                self.site,
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
        row = cur.fetchone()
        if row is None:
            return None
        fid = int(row[0])
        added = self._add_evidence(fid, f.evidence)
        self._x("UPDATE findings SET occurrences = ? WHERE id = ?", (max(added, 1), fid))
        return fid

    def _add_evidence(self, fid: int, evidence: Iterable[Evidence]) -> int:
        """Add evidence not yet held; returns how many were new.

        Evidence already held under the same key is brought up to date (a session seen longer
        on a later scan keeps its key, its start, and gets its new end and bytes).
        """
        added = 0
        for e in evidence:
            data = json.dumps(dict(e.data), ensure_ascii=False, sort_keys=True)
            cur = self._x(
                "INSERT INTO evidence (finding_id, key, observed_at, data) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (fid, e.key, ts(e.observed_at), data),
            )
            if cur.rowcount:
                added += 1
            else:
                self._x(
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
        if self.scope is not None:
            where.append("site = ?")
            args.append(self.scope)
        if subject is not None:
            for part, value in subject.as_dict().items():
                where.append(self._nocase(part))
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
            rows = self._x(sql + f" ORDER BY id LIMIT {size}", [*args, after]).fetchall()
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
        scope, args = self._scoped()
        sql = "SELECT count(*) FROM findings WHERE 1 = 1" + scope
        if status is not None:
            sql += " AND status = ?"
            args.append(status.value)
        if created_before is not None:
            sql += " AND created_at < ?"
            args.append(ts(created_before))
        if pupil_only:
            sql += " AND pupil_involved = 1"
        return int(self._x(sql, args).fetchone()[0])

    def count_findings(self, *, pupil_only: bool = False) -> dict[str, int]:
        """How many findings there are in each status."""
        scope, args = self._scoped()
        pupil = " AND pupil_involved = 1" if pupil_only else ""
        rows = self._x(
            f"SELECT status, count(*) FROM findings WHERE 1 = 1{scope}{pupil} GROUP BY status", args
        )
        return {status: int(n) for status, n in rows}

    def created_times(self, *, since: datetime, pupil_only: bool = False) -> list[datetime]:
        """When each finding recorded since `since` was recorded (the digest's day-by-day chart)."""
        pupil = " AND pupil_involved = 1" if pupil_only else ""
        scope, args = self._scoped()
        rows = self._x(
            f"SELECT created_at FROM findings WHERE created_at >= ?{scope}{pupil}", [ts(since), *args]
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
            rows = self._x(
                f"SELECT finding_id, key, observed_at, data FROM evidence WHERE finding_id IN "
                f"({','.join('?' * len(chunk))}) ORDER BY observed_at, id",
                chunk,
            )
            for fid, key, observed, data in rows:
                out.setdefault(fid, []).append(Evidence(key, parse_ts(observed), json.loads(data)))
        return {k: tuple(v) for k, v in out.items()}

    @staticmethod
    def _finding_row(r: tuple[Any, ...]) -> StoredFinding:
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
            row = self._x("SELECT status FROM findings WHERE id = ?", (fid,)).fetchone()
            if row is None:
                raise UsageError(f"no finding #{fid}")
            self._x(
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
            cur = self._x(
                """INSERT INTO approvals (site, rule, staff, address, room, device, service, valid_from,
                     valid_until, approved_by, reason, granted_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id""",
                (
                    self.scope or "",
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
            approval = self.get_approval(int(cur.fetchone()[0]))
            changed = 0
            for f in self.list_findings(rule=rule, status=Status.OPEN, subject=subject, with_evidence=True):
                if all(
                    approval.covers(rule, f.subject, e.observed_at) for e in f.evidence
                ) and approval.covers(rule, f.subject, f.first_seen):
                    self._x(
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
            self._x(
                "UPDATE approvals SET revoked_at = ?, revoked_by = ?, revoke_reason = ? WHERE id = ?",
                (ts(now), by, reason, aid),
            )
            cur = self._x(
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
        row = self._x(f"SELECT {self._APPROVAL_COLUMNS} FROM approvals WHERE id = ?", (aid,)).fetchone()
        if row is None:
            raise UsageError(f"no approval #{aid}")
        return self._approval_row(row)

    _APPROVAL_COLUMNS = (
        "id, rule, staff, address, room, device, service, valid_from, valid_until, approved_by, reason, "
        "granted_at, revoked_at, revoked_by, revoke_reason"
    )

    def list_approvals(self, *, active_at: datetime | None = None) -> list[Approval]:
        # A site sees its own approvals and the trust-wide ones (site '').
        scope = "" if self.scope is None else " WHERE site IN ('', ?)"
        args = [] if self.scope is None else [self.scope]
        rows = self._x(f"SELECT {self._APPROVAL_COLUMNS} FROM approvals{scope} ORDER BY id", args)
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
        scope, args = self._scoped()
        rows = self._x(
            f"SELECT approval_id, count(*) FROM findings WHERE approval_id IS NOT NULL{scope}{pupil} "
            "GROUP BY approval_id",
            args,
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
        scope, args = self._scoped()
        sql = "SELECT id, at, actor, action, target, details FROM audit_log WHERE 1 = 1" + scope
        if since is not None:
            sql += " AND at >= ?"
            args.append(ts(since))
        sql += " ORDER BY id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [
            AuditEntry(i, parse_ts(at), actor, action, target, json.loads(details))
            for i, at, actor, action, target, details in self._x(sql, args)
        ]

    # ---- checkpoints and runs ---------------------------------------------------------------

    def get_checkpoint(self, source: str, key: str) -> str | None:
        row = self._x(
            "SELECT value FROM checkpoints WHERE site = ? AND source = ? AND key = ?",
            (self.site, source, key),
        ).fetchone()
        return None if row is None else str(row[0])

    def get_checkpoints(self, source: str) -> dict[str, str]:
        rows = self._x(
            "SELECT key, value FROM checkpoints WHERE site = ? AND source = ?", (self.site, source)
        )
        return {str(k): str(v) for k, v in rows}

    def set_checkpoint(self, source: str, key: str, value: str, now: datetime) -> None:
        with self.transaction():
            self._x(
                """INSERT INTO checkpoints (site, source, key, value, updated_at) VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (site, source, key)
                   DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at""",
                (self.site, source, key, value, ts(now)),
            )

    def forget_checkpoint(self, source: str, key: str) -> None:
        with self.transaction():
            self._x(
                "DELETE FROM checkpoints WHERE site = ? AND source = ? AND key = ?", (self.site, source, key)
            )

    # ---- recent network observations ------------------------------------------------------

    def remember_observations(self, source: str, observations: Iterable[NetObservation]) -> None:
        """Keep streaming observations for the next scan's sessions (idempotent)."""
        with self.transaction():
            self._many(
                """INSERT INTO net_recent (site, source, client, server, host, via, service, category,
                     ts, first_seen, last_seen, bytes, flow) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT DO NOTHING""",
                [
                    (
                        self.site,
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
        rows = self._x(
            """SELECT client, server, host, via, service, category, ts, first_seen, last_seen, bytes, flow
               FROM net_recent WHERE site = ? AND source = ? AND coalesce(last_seen, ts) >= ?
               ORDER BY ts, id""",
            (self.site, source, ts(since)),
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
            cur = self._x(
                "DELETE FROM net_recent WHERE site = ? AND source = ? AND coalesce(last_seen, ts) < ?",
                (self.site, source, ts(before)),
            )
        return int(cur.rowcount)

    # ---- files of a shared log folder ------------------------------------------------------

    def claim_file(
        self, identity: str, *, source: str, path: str, owner: str, now: datetime, lease: timedelta
    ) -> bool:
        """Claim a finished log file for this reader; False when another reader has it or had it.

        Several daemons may read one folder (a Zeek cluster's archive): the first to insert the
        file's row owns it. A claim not finished within `lease` (its reader died) may be taken over; its own
        owner may take an unfinished claim again at once (its last attempt failed).
        """
        with self.transaction():
            got = self._x(
                "INSERT INTO ingested_files (identity, site, source, path, owner, claimed_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (identity, self.site, source, path, owner, ts(now)),
            ).rowcount
            if not got:
                got = self._x(
                    "UPDATE ingested_files SET owner = ?, claimed_at = ?, site = ?, source = ?, path = ? "
                    "WHERE identity = ? AND done_at IS NULL AND (claimed_at < ? OR owner = ?)",
                    (owner, ts(now), self.site, source, path, identity, ts(now - lease), owner),
                ).rowcount
        return bool(got)

    def finish_file(self, identity: str, *, owner: str, now: datetime) -> None:
        """Mark a claimed file ingested, in the transaction that records its findings: if the claim
        was lost meanwhile (taken over after its lease), the whole transaction is refused."""
        with self.transaction():
            done = self._x(
                "UPDATE ingested_files SET done_at = ? WHERE identity = ? AND owner = ? AND done_at IS NULL",
                (ts(now), identity, owner),
            ).rowcount
            if not done:
                raise StoreError(f"lost the claim on a log file ({identity})", where=self.where)

    def start_run(self, source: str, kind: str, now: datetime) -> int:
        with self.transaction():
            cur = self._x(
                "INSERT INTO runs (site, source, kind, started_at, status) VALUES (?, ?, ?, ?, 'running') "
                "RETURNING id",
                (self.site, source, kind, ts(now)),
            )
            return int(cur.fetchone()[0])

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
            self._x(
                "UPDATE runs SET finished_at = ?, status = ?, items = ?, skipped = ?, findings = ?, "
                "error = ? WHERE id = ?",
                (ts(now), status, items, skipped, findings, error, run_id),
            )

    _RUN_COLUMNS = "id, source, kind, started_at, finished_at, status, items, skipped, findings, error"

    def last_runs(self) -> list[RunRecord]:
        """The latest run of every source, by source name (and site, reading the whole trust)."""
        scope, args = self._scoped()
        rows = self._x(
            f"SELECT {self._RUN_COLUMNS} FROM runs WHERE id IN "
            f"(SELECT max(id) FROM runs WHERE 1 = 1{scope} GROUP BY site, source) ORDER BY source, site",
            args,
        )
        return [self._run_row(r) for r in rows]

    def last_success(self, source: str) -> RunRecord | None:
        row = self._x(
            f"SELECT {self._RUN_COLUMNS} FROM runs WHERE site = ? AND source = ? AND status = 'ok' "
            "ORDER BY id DESC LIMIT 1",
            (self.site, source),
        ).fetchone()
        return None if row is None else self._run_row(row)

    def list_runs(self, *, since: datetime | None = None) -> list[RunRecord]:
        scope, args = self._scoped()
        sql = f"SELECT {self._RUN_COLUMNS} FROM runs WHERE 1 = 1{scope}"
        if since is not None:
            sql += " AND started_at >= ?"
            args.append(ts(since))
        return [self._run_row(r) for r in self._x(sql + " ORDER BY id", args)]

    @staticmethod
    def _run_row(r: tuple[Any, ...]) -> RunRecord:
        rid, source, kind, started, finished, status, items, skipped, findings, error = r
        return RunRecord(
            rid, source, kind, parse_ts(started), _opt_ts(finished), status, items, skipped, findings, error
        )

    # ---- digests ----------------------------------------------------------------------------

    def digest_record(self, day: str, recipient: str) -> DigestRecord | None:
        row = self._x(
            "SELECT day, recipient, status, attempts, last_error, message_id, sent_at FROM digests "
            "WHERE site = ? AND day = ? AND recipient = ?",
            (self.scope or "", day, recipient),
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
            self._x(
                """INSERT INTO digests
                     (site, day, recipient, status, attempts, last_error, message_id, created_at, sent_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (site, day, recipient) DO UPDATE SET status = excluded.status,
                     attempts = digests.attempts + excluded.attempts, last_error = excluded.last_error,
                     message_id = coalesce(excluded.message_id, digests.message_id),
                     sent_at = coalesce(excluded.sent_at, digests.sent_at)""",
                (
                    self.scope or "",
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
        row = self._x(
            "SELECT max(day) FROM digests WHERE status = 'sent' AND site = ?", (self.scope or "",)
        ).fetchone()
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
        scope, sargs = self._scoped()  # a site's daemon purges its own site; a trust-wide one, all

        def delete(sql: str, since: str) -> int:
            return int(self._x(sql + scope, [since, *sargs]).rowcount)

        with self.transaction():
            findings = delete("DELETE FROM findings WHERE last_seen < ?", cutoff)
            runs = delete(
                "DELETE FROM runs WHERE started_at < ? "
                "AND id NOT IN (SELECT max(id) FROM runs GROUP BY site, source)",
                cutoff,
            )
            checkpoints = delete("DELETE FROM checkpoints WHERE updated_at < ?", cutoff)
            delete("DELETE FROM digests WHERE created_at < ?", cutoff)
            delete("DELETE FROM net_recent WHERE ts < ?", cutoff)
            delete("DELETE FROM ingested_files WHERE claimed_at < ?", cutoff)
            audit = 0
            if audit_before is not None:
                audit = delete("DELETE FROM audit_log WHERE at < ?", ts(audit_before))
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
        scope, args = self._scoped()
        rows = self._x(
            "SELECT day, recipient, status, attempts, last_error, message_id, sent_at FROM digests "
            f"WHERE 1 = 1{scope} ORDER BY day DESC, recipient",
            args,
        )
        return [DigestRecord(d, r, st, n, err, mid, _opt_ts(sent)) for d, r, st, n, err, mid, sent in rows]

    # ---- console users and sessions ---------------------------------------------------------

    _USER_COLUMNS = "email, role, password_hash, created_at, failed_attempts, locked_until, last_signin, site"

    def add_user(
        self, email: str, role: str, password_hash: str | None, *, by: str, now: datetime, site: str = ""
    ) -> None:
        """Add a console account; audited. An existing account is an error, not a silent change.

        `site` limits what the account reads to one site; '' reads the whole trust."""
        email = email.strip().lower()
        with self.transaction():
            if self.get_user(email) is not None:
                raise UsageError(f"user {email} already exists (remove it first to change it)")
            self._x(
                "INSERT INTO users (email, role, password_hash, created_at, site) VALUES (?, ?, ?, ?, ?)",
                (email, role, password_hash, ts(now), site),
            )
            self._audit(
                by, "user.add", f"user:{email}", {"role": role, **({"site": site} if site else {})}, now
            )

    def remove_user(self, email: str, *, by: str, now: datetime) -> None:
        """Remove an account and end its sessions; audited."""
        email = email.strip().lower()
        with self.transaction():
            if self.get_user(email) is None:
                raise UsageError(f"no user {email}")
            self._x("DELETE FROM sessions WHERE email = ?", (email,))
            self._x("DELETE FROM users WHERE email = ?", (email,))
            self._audit(by, "user.remove", f"user:{email}", {}, now)

    def get_user(self, email: str) -> UserRecord | None:
        row = self._x(
            f"SELECT {self._USER_COLUMNS} FROM users WHERE email = ?", (email.strip().lower(),)
        ).fetchone()
        return None if row is None else _user_row(row)

    def list_users(self) -> list[UserRecord]:
        return [_user_row(r) for r in self._x(f"SELECT {self._USER_COLUMNS} FROM users ORDER BY email")]

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
            self._x(
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
            self._x("DELETE FROM sessions WHERE expires_at < ?", (ts(now),))
            self._x(
                "INSERT INTO sessions (id, email, csrf, created_at, expires_at, last_seen) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (sid, email.strip().lower(), csrf, ts(now), ts(expires_at), ts(now)),
            )

    def get_session(self, sid: str, *, now: datetime) -> SessionRecord | None:
        """The live session with this id and its user, or None (unknown, expired or user removed)."""
        row = self._x(
            "SELECT s.id, s.email, u.role, s.csrf, s.created_at, s.expires_at, u.site FROM sessions s "
            "JOIN users u ON u.email = s.email WHERE s.id = ? AND s.expires_at > ?",
            (sid, ts(now)),
        ).fetchone()
        if row is None:
            return None
        i, email, role, csrf, created, expires, site = row
        return SessionRecord(i, email, role, csrf, parse_ts(created), parse_ts(expires), site)

    def touch_session(self, sid: str, *, expires_at: datetime, now: datetime) -> None:
        with self.transaction():
            self._x(
                "UPDATE sessions SET expires_at = ?, last_seen = ? WHERE id = ?",
                (ts(expires_at), ts(now), sid),
            )

    def delete_session(self, sid: str) -> None:
        with self.transaction():
            self._x("DELETE FROM sessions WHERE id = ?", (sid,))

    def console_key(self, name: str) -> bytes:
        """A random 32-byte key kept in the store (pseudonyms, sign-in tokens), made on first use."""
        with self.transaction():
            self._x(
                "INSERT INTO console_keys (name, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (name, os.urandom(32)),
            )
            row = self._x("SELECT value FROM console_keys WHERE name = ?", (name,)).fetchone()
        return bytes(row[0])


CLAIM_LEASE = timedelta(hours=1)  # a claimed file not ingested by then may be taken over
_ROTATED = re.compile(r"\.\d[^/]*\.log$")  # conn.09:00:00-10:00:00.log, conn.2026-11-24-10-00-00.log


def finished_log(path: Path) -> bool:
    """A log file that is written no more: compressed, or rotated under a time-stamped name. Only
    these are claimed; a live file (conn.log) is followed by one daemon through its checkpoint."""
    return path.name.endswith(".gz") or bool(_ROTATED.search(path.name))


def file_identity(path: Path) -> str:
    """What makes a log file the same file on every host that mounts the folder: its name, size and
    a hash of its first and last 64 KiB (not its path, which differs between mounts, nor its inode)."""
    import hashlib

    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        digest.update(fh.read(65536))
        if size > 65536:
            fh.seek(max(65536, size - 65536))
            digest.update(fh.read(65536))
    return f"{path.name}:{size}:{digest.hexdigest()[:32]}"


def reader_id(site: str) -> str:
    """Who holds a claim: this process on this host, for this site."""
    import socket

    return f"{site}@{socket.gethostname()}:{os.getpid()}"


@contextmanager
def site_lock(config: Config) -> Iterator[None]:
    """One daemon per site on a PostgreSQL store: a session advisory lock on the site's name,
    held on its own connection for the daemon's life (PostgreSQL drops it if the daemon dies)."""
    import psycopg

    store = Store.connect(config)
    site = store.site
    try:
        got = store._conn.execute(
            "SELECT pg_try_advisory_lock(4242002, hashtext(%s))", (f"choysez-auditd:{site}",)
        ).fetchone()[0]
        if not got:
            raise StoreError(f"another choysez-auditd daemon is running for site {site!r}", where=store.where)
        yield
    except psycopg.Error as exc:
        raise StoreError(f"cannot lock the site: {_first_line(exc)}", where=store.where) from None
    finally:
        store.close()


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
    site: str = ""  # '' reads the whole trust; else only this site's records


@dataclass(frozen=True)
class SessionRecord:
    id: str
    email: str
    role: str
    csrf: str
    created_at: datetime
    expires_at: datetime
    site: str = ""  # the user's site: what the console shows them ('' = the whole trust)


def _user_row(r: tuple[Any, ...]) -> UserRecord:
    email, role, pw, created, failed, locked, last, site = r
    return UserRecord(email, role, pw, parse_ts(created), int(failed), _opt_ts(locked), _opt_ts(last), site)


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


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@lru_cache(maxsize=512)
def _sql(dialect: str, sql: str) -> str:
    """The common SQL in a backend's terms: SQLite spells greatest/least as max/min of two,
    psycopg takes `%s` placeholders. No statement holds a literal `?` or `%`."""
    if dialect == "sqlite":
        return sql.replace("greatest(", "max(").replace("least(", "min(")
    return sql.replace("?", "%s")
