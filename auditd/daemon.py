"""`choysez-auditd run`: the daemon. Scheduled scans, the daily digest and the retention purge.

One APScheduler 3 `BackgroundScheduler` with a single worker thread (SQLite likes one writer;
each job opens its own store connection), and a main thread that handles signals and systemd:

- each source is a job at its `interval_minutes`, the first run at start-up; a failing source is
  recorded as its health and never stops the others;
- the digest runs at `[digest] time` in the organisation's time zone (a cron trigger with the
  zone, so clock changes move nothing), runs late rather than never after a sleep or a clock jump,
  and every 15 minutes a catch-up sends any past day's digest still owed (see `auditd.digest.send`);
- the retention purge runs daily and at start-up;
- systemd `Type=notify`: READY=1 once scheduled, WATCHDOG=1 at half of `WATCHDOG_USEC`,
  RELOADING=1 / STOPPING=1; the protocol is one datagram to `$NOTIFY_SOCKET` (no libsystemd);
- SIGTERM or SIGINT: no new job starts, a running mail scan stops after its current batch (whose
  findings and checkpoint are committed together), and the process exits within 10 seconds;
- SIGHUP: config, policies and directory are loaded again; a bad new config is logged and the old
  one keeps running;
- one daemon per store: `<store>.lock` is held with `flock` while it runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from auditd.config import Config, load_config
from auditd.digest.send import (
    Outcome,
    Send,
    SmtpSettings,
    deliver_day,
    deliver_due,
    digest_window,
    retry_delay,
)
from auditd.directory import People, load_directory
from auditd.errors import AuditError, DeliveryError, StoreError
from auditd.logging import configure, get_logger
from auditd.pipeline import Context, SourceReport, scan_mail, scan_net
from auditd.policy import Policy, load_policy
from auditd.store import PurgeResult, Store, site_lock

STOP_DEADLINE = 8.0  # seconds to let a running job finish after SIGTERM (systemd waits 90, we promise 10)
CATCH_UP_MINUTES = 15
PURGE_AT = (3, 30)  # local time of the daily retention purge
TICK = 0.2  # how often the main loop looks at signals

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


# ---- systemd notification -------------------------------------------------------------------


def sd_notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one state message (`READY=1`, `WATCHDOG=1`...) to systemd; False when not under systemd.

    `$NOTIFY_SOCKET` is a datagram socket: a path, or an abstract name when it starts with '@'.
    """
    address = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of `$WATCHDOG_USEC`, when it is meant for this process."""
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (owner.isdigit() and int(owner) != pid):
        return None
    return int(usec) / 2_000_000


# ---- one daemon per store -------------------------------------------------------------------


def lock_path(config: Config) -> Path:
    return config.store.path.with_name(config.store.path.name + ".lock")


@contextlib.contextmanager
def store_lock(config: Config) -> Iterator[None]:
    """Hold `<store>.lock` (flock) for the daemon's life; a second daemon is refused, naming the first.

    With a PostgreSQL store the lock is the site's advisory lock: one daemon per site."""
    if config.store.url is not None:
        with site_lock(config):
            yield
        return
    path = lock_path(config)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise StoreError(f"cannot lock: {exc.strerror}", where=str(path)) from None
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise StoreError(
                f"another choysez-auditd run is using {config.store.path} (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# ---- what the jobs do -----------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    """Config, policy and directory as loaded together (at start and on SIGHUP)."""

    config: Config
    policy: Policy
    people: People


def load_all(path: Path) -> Loaded:
    config = load_config(path)
    return Loaded(config, load_policy(config.policy.dir), load_directory(config))


def purge_store(config: Config, store: Store, now: datetime) -> PurgeResult:
    """Delete what is older than the retention: findings with their evidence, runs, checkpoints.

    The audit log is kept for `audit_retention_days` (default 730), longer than the findings.
    """
    return store.purge(
        before=now - timedelta(days=config.store.retention_days),
        now=now,
        audit_before=now - timedelta(days=config.store.audit_retention_days),
    )


def smtp_sender(config: Config) -> Send:
    """The SMTP sender; a config problem (an unreadable password file) fails each send, recorded."""
    try:
        return SmtpSettings.from_config(config).send
    except AuditError as exc:
        problem = str(exc)

        def refuse(msg: Any) -> None:
            raise DeliveryError(problem)

        return refuse


class Daemon:
    """The scheduler, its jobs and the main loop. `clock` and `send` are injectable for tests."""

    def __init__(
        self,
        config_path: Path,
        loaded: Loaded,
        *,
        digest_now: bool = False,
        clock: Clock = utc_now,
        send: Callable[[Config], Send] = smtp_sender,
        env: Mapping[str, str] | None = None,
    ) -> None:
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        self.config_path = config_path
        self.loaded = loaded
        self.digest_now = digest_now
        self.clock = clock
        self.make_sender = send
        self.env = dict(os.environ if env is None else env)
        self.stopping = threading.Event()
        self.log = get_logger()
        self._signals: list[int] = []
        self._busy = threading.Condition()
        self._running = 0
        self.scheduler: Any = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=1)},
            job_defaults={"coalesce": True, "max_instances": 1},
            timezone=UTC,
        )

    # ---- jobs ------------------------------------------------------------------------------

    def _job(self, job: str, source: str | None, body: Callable[[], None]) -> None:
        """Run one job with its context bound to every log line; nothing it raises stops the daemon."""
        import structlog

        if self.stopping.is_set():
            return
        with self._busy:
            self._running += 1
        run_id = uuid.uuid4().hex[:12]
        bound = {"job": job, "run_id": run_id} | ({"source": source} if source else {})
        try:
            with structlog.contextvars.bound_contextvars(**bound):
                try:
                    body()
                except Exception as exc:
                    self.log.exception("job failed", error=str(exc))
        finally:
            with self._busy:
                self._running -= 1
                self._busy.notify_all()

    def scan(self, name: str) -> None:
        self._job("scan", name, lambda: self._scan(name))

    def _scan(self, name: str) -> None:
        loaded = self.loaded
        config = loaded.config
        kind = "mail" if name in {s.name for s in config.mail.sources} else "net"
        now = self.clock()
        with Store.connect(config) as store:
            ctx = Context(config, loaded.policy, loaded.people, store, stop=self.stopping.is_set)
            reports: list[SourceReport] = (
                scan_mail(ctx, now=now, only=name) if kind == "mail" else scan_net(ctx, now=now, only=name)
            )
        for r in reports:
            fields = {"kind": r.kind, "items": r.items, "new": r.new, "skipped": r.skipped}
            if r.ok:
                self.log.info("scan finished", **fields, first_problem=r.first_problem)
            else:
                self.log.error("scan failed", **fields, error=r.error)

    def digest(self, *, include_latest: bool = True, now_digest: bool = False) -> None:
        self._job("digest", None, lambda: self._digest(include_latest=include_latest, now_digest=now_digest))

    def _digest(self, *, include_latest: bool, now_digest: bool) -> None:
        loaded = self.loaded
        config = loaded.config
        now = self.clock()
        send = self.make_sender(config)
        with Store.connect(config) as store:
            outcomes = deliver_due(config, store, loaded.policy, now, send, include_latest=include_latest)
            if now_digest:
                tz = config.organisation.tz
                today = now.astimezone(tz).date()
                start, _ = digest_window(today, config.digest.at, tz)
                outcomes += deliver_day(config, store, loaded.policy, today, now, send, window=(start, now))
        self._log_outcomes(outcomes)
        failed = [o for o in outcomes if o.status == "failed"]
        if failed:
            attempts = max(o.attempts for o in failed)
            delay = retry_delay(attempts, timedelta(seconds=config.digest.retry_seconds))
            self.scheduler.add_job(
                self.digest,
                "date",
                run_date=now + delay,
                kwargs={"include_latest": False},
                id="digest-retry",
                replace_existing=True,
                misfire_grace_time=None,
            )
            self.log.warning("digest retry scheduled", at=(now + delay).isoformat(), attempts=attempts)

    def _log_outcomes(self, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            fields = {"day": o.day.isoformat(), "recipient": o.recipient, "attempts": o.attempts}
            if o.status == "sent":
                self.log.info("digest sent", **fields, new=o.new)
            elif o.status == "failed":
                self.log.error("digest not sent", **fields, error=o.error)

    def purge(self) -> None:
        self._job("purge", None, self._purge)

    def _purge(self) -> None:
        config = self.loaded.config
        with Store.connect(config) as store:
            r = purge_store(config, store, self.clock())
        self.log.info(
            "retention purge", findings=r.findings, runs=r.runs, checkpoints=r.checkpoints, audit=r.audit
        )

    # ---- schedule ----------------------------------------------------------------------------

    def schedule(self, *, startup: bool) -> None:
        """(Re)build the jobs from the loaded config; sources new since the last build run now."""
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        config = self.loaded.config
        now = datetime.now(UTC)  # APScheduler runs on the real clock
        wanted: set[str] = set()
        for src in (*config.mail.sources, *config.network.sources):
            if not src.enabled:
                continue
            job_id = f"scan:{src.name}"
            wanted.add(job_id)
            existing = self.scheduler.get_job(job_id)
            seconds = src.interval_minutes * 60
            if existing is not None and existing.trigger.interval == timedelta(seconds=seconds):
                continue
            self.scheduler.add_job(
                self.scan,
                IntervalTrigger(seconds=seconds, timezone=UTC),
                args=[src.name],
                id=job_id,
                name=job_id,
                next_run_time=now,
                replace_existing=True,
                misfire_grace_time=seconds,
            )
        for job in self.scheduler.get_jobs():
            if job.id.startswith("scan:") and job.id not in wanted:
                job.remove()
        tz = config.organisation.tz
        at = config.digest.at
        self.scheduler.add_job(
            self.digest,
            CronTrigger(hour=at.hour, minute=at.minute, timezone=tz),
            id="digest",
            name="digest",
            replace_existing=True,
            misfire_grace_time=None,  # after a sleep or a clock jump: late, once (coalesced), never lost
        )
        self.scheduler.add_job(
            self.digest,
            IntervalTrigger(minutes=CATCH_UP_MINUTES, timezone=UTC),
            kwargs={"include_latest": False},
            id="digest-catch-up",
            name="digest-catch-up",
            replace_existing=True,
            # at start-up, just after the first scans (the single worker runs jobs in order)
            next_run_time=now + timedelta(seconds=1) if startup else None,
            misfire_grace_time=None,
        )
        self.scheduler.add_job(
            self.purge,
            CronTrigger(hour=PURGE_AT[0], minute=PURGE_AT[1], timezone=tz),
            id="purge",
            name="purge",
            replace_existing=True,
            next_run_time=now if startup else None,
            misfire_grace_time=None,
        )
        if startup and self.digest_now:
            self.scheduler.add_job(
                self.digest,
                "date",
                run_date=now + timedelta(seconds=1),
                kwargs={"include_latest": False, "now_digest": True},
                id="digest-now",
                misfire_grace_time=None,
            )

    # ---- signals and the main loop -------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)  # the main loop acts on it; nothing here that takes a lock

    def reload(self) -> bool:
        """Load config, policy and directory again; keep the running ones if anything is wrong."""
        self.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            fresh = load_all(self.config_path)
            if fresh.config.store.path != self.loaded.config.store.path:
                raise StoreError(
                    f"store.path changed to {fresh.config.store.path}; restart to move the store",
                    where=str(self.config_path),
                )
        except AuditError as exc:
            self.log.error("reload rejected; the running config stays", job="reload", error=str(exc))
            self.notify("READY=1\nSTATUS=reload rejected: the previous config is running")
            return False
        self.loaded = fresh
        self.schedule(startup=False)
        self.log.info("config reloaded", job="reload", config=str(self.config_path))
        self.notify("READY=1\nSTATUS=running (config reloaded)")
        return True

    def notify(self, state: str) -> bool:
        return sd_notify(state, self.env)

    def run(self) -> int:
        """Start the scheduler and serve until SIGTERM/SIGINT; returns the exit status."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.schedule(startup=True)
        self.scheduler.start()
        self._start_console()
        sources = [s.name for s in (*self.loaded.config.mail.sources, *self.loaded.config.network.sources)]
        self.log.info("started", job="daemon", pid=os.getpid(), config=str(self.config_path), sources=sources)
        self.notify(f"READY=1\nSTATUS=running\nMAINPID={os.getpid()}")
        ping = watchdog_interval(self.env, os.getpid())
        next_ping = time.monotonic()
        while True:
            while self._signals:
                signum = self._signals.pop(0)
                if signum == signal.SIGHUP:
                    self.reload()
                else:
                    return self.shutdown(signal.Signals(signum).name)
            if ping is not None and time.monotonic() >= next_ping:
                self.notify("WATCHDOG=1")
                next_ping = time.monotonic() + ping
            time.sleep(TICK)

    def _start_console(self) -> None:
        """With a `[console]` section, the review console is served beside the jobs until stop."""
        config = self.loaded.config
        if config.console is None:
            return
        from auditd.console import serve_console

        def serve() -> None:
            try:
                serve_console(
                    config,
                    self.stopping,
                    on_ready=lambda host, port: self.log.info(
                        "console listening", job="console", url=f"http://{host}:{port}/"
                    ),
                )
            except Exception as exc:  # a console that cannot listen must not stop the audit itself
                self.log.error("console failed", job="console", error=str(exc))

        threading.Thread(target=serve, name="console", daemon=True).start()

    def shutdown(self, why: str) -> int:
        """Stop taking jobs, let the running one reach a batch boundary, and go."""
        self.log.info("stopping", job="daemon", signal=why)
        self.notify("STOPPING=1\nSTATUS=stopping")
        self.stopping.set()
        self.scheduler.shutdown(wait=False)
        deadline = time.monotonic() + STOP_DEADLINE
        with self._busy:
            while self._running and time.monotonic() < deadline:
                self._busy.wait(timeout=0.1)
            unfinished = self._running
        if unfinished:
            # Its uncommitted batch rolls back with the process; the checkpoint resumes it next time.
            self.log.warning("a job was still running at the deadline; it resumes from its checkpoint")
            sys.stdout.flush()
            os._exit(0)
        self.log.info("stopped", job="daemon")
        return 0


def run_daemon(config_path: Path, *, digest_now: bool = False) -> int:
    """`choysez-auditd run`: validate, take the store's lock, and serve."""
    configure()
    loaded = load_all(config_path)
    with store_lock(loaded.config):
        Store.connect(loaded.config).close()  # create or migrate before any job runs
        return Daemon(config_path.absolute(), loaded, digest_now=digest_now).run()
