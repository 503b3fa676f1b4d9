"""The pipeline, end to end: sources -> events -> rules -> findings -> store.

Each source runs on its own: its findings and its checkpoint are committed together, and its
failure is recorded as its health without stopping the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

from auditd.classifier import Classifier
from auditd.classifier import classify as classify  # the CLI and tests classify with the scan's rules
from auditd.classifier import connection as connection
from auditd.classifier import matches_only as matches_only
from auditd.config import Config, MailSourceConfig
from auditd.directory import People, load_devices, load_directory
from auditd.errors import AuditError, InputError
from auditd.model import Finding, MailMessage, NetObservation
from auditd.policy import Policy, load_policy
from auditd.rules.mail import MailRules
from auditd.rules.net import RoomIndex, Thresholds, streaming_in_class
from auditd.sources.base import NetBatch, NetSource, mail_source
from auditd.sources.mailfile import MailStats
from auditd.sources.netfiles import given_files, net_source
from auditd.store import Store, reader_id

BATCH = 500


@dataclass
class SourceReport:
    """What one pass over one source did: the basis of `scan`'s summary and of source health."""

    name: str
    kind: str
    items: int = 0
    skipped: int = 0
    new: int = 0
    seen: int = 0
    first_problem: str | None = None
    error: str | None = None
    rules: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Context:
    """Everything a scan needs, loaded once: config, policy, directory and the store."""

    config: Config
    policy: Policy
    people: People
    store: Store
    stop: Callable[[], bool] | None = None  # the daemon's shutdown flag, checked between batches

    @classmethod
    def load(cls, config: Config, store: Store) -> Context:
        return cls(config, load_policy(config.policy.dir), load_directory(config), store)

    def mail_rules(self) -> MailRules:
        return MailRules(
            self.people,
            self.policy,
            self.config.organisation.is_official,
            self.config.mail.business_threshold,
        )

    def classifier(self) -> Classifier:
        cats = self.config.network.categories
        return self.policy.classifier(set(cats) if cats is not None else None)

    def thresholds(self) -> Thresholds:
        net, pol = self.config.network, self.policy.network
        return Thresholds(
            gap=timedelta(minutes=net.session_gap_minutes or pol.session_gap_minutes),
            min_duration=timedelta(
                minutes=net.min_session_minutes
                if net.min_session_minutes is not None
                else pol.min_session_minutes
            ),
            min_bytes=net.min_session_bytes if net.min_session_bytes is not None else pol.min_session_bytes,
        )


def _record(ctx: Context, findings: list[Finding], report: SourceReport, now: datetime) -> None:
    if not findings:
        return
    approvals = ctx.store.list_approvals()
    horizon = now - timedelta(days=ctx.config.store.retention_days)
    result = ctx.store.record_findings(findings, now=now, approvals=approvals, not_before=horizon)
    report.new += result.new
    report.seen += len(findings)
    for f in findings:
        report.rules[f.rule] = report.rules.get(f.rule, 0) + 1


def _run(
    ctx: Context, name: str, kind: str, now: datetime, body: Callable[[SourceReport], None]
) -> SourceReport:
    """Run one source's pass, recording it as a run whatever happens."""
    report = SourceReport(name, kind)
    run_id = ctx.store.start_run(name, kind, now)
    try:
        body(report)
    except AuditError as exc:
        report.error = str(exc)
    except OSError as exc:
        report.error = f"{exc.filename or name}: {exc.strerror or exc}"
    ctx.store.finish_run(
        run_id,
        status="ok" if report.ok else "failed",
        items=report.items,
        skipped=report.skipped,
        findings=report.new,
        error=report.error or report.first_problem,
        now=now,
    )
    return report


# ---- mail -------------------------------------------------------------------------------------


MailItems = Iterable[tuple[MailMessage | None, Mapping[str, str]]]


def _mail_batches(ctx: Context, report: SourceReport, now: datetime, items: MailItems, source: str) -> None:
    """Evaluate messages; commit findings with the checkpoints every BATCH messages.

    Each item is a message (or None for a checkpoint-only update) and the checkpoint updates
    that hold once it and everything before it are committed.
    """
    rules = ctx.mail_rules()
    findings: list[Finding] = []
    pending: dict[str, str] = {}

    def flush() -> None:
        with ctx.store.transaction():
            _record(ctx, findings, report, now)
            for key, value in pending.items():
                ctx.store.set_checkpoint(source, key, value, now)
        findings.clear()
        pending.clear()

    count = 0
    for msg, updates in items:
        if msg is not None:
            count += 1
            report.items += 1
            findings.extend(rules.evaluate(msg, now=now))
        pending.update(updates)
        if msg is not None and count % BATCH == 0:
            flush()
            if ctx.stop is not None and ctx.stop():
                return  # shutting down: this batch and its checkpoint are committed; resume there
    flush()


def scan_mail(ctx: Context, *, now: datetime, only: str | None = None) -> list[SourceReport]:
    sources = [s for s in ctx.config.mail.sources if s.enabled and (only is None or s.name == only)]
    if only is not None and not sources:
        raise InputError(f"no enabled mail source named {only!r}", where=str(ctx.config.path))
    return [
        _run(ctx, src.name, "mail", now, partial(_scan_mail_source, ctx, src, now=now)) for src in sources
    ]


def _scan_mail_source(ctx: Context, src: MailSourceConfig, report: SourceReport, now: datetime) -> None:
    """One incremental pass over a mail source from its checkpoints, then its mailboxes' inbox rules."""
    source = mail_source(src, ctx.config.base)
    stats = MailStats()
    _mail_batches(ctx, report, now, source.read(ctx.store.get_checkpoints(src.name), stats), src.name)
    report.skipped = stats.unparseable
    report.first_problem = stats.first_problem
    if ctx.stop is not None and ctx.stop():
        return
    rules = source.forwarding_rules(now)
    if rules:
        with ctx.store.transaction():
            _record(ctx, ctx.mail_rules().forwarding(rules, now=now), report, now)


# ---- network ----------------------------------------------------------------------------------


SESSION_CONTEXT = timedelta(hours=2)  # how far back a new observation may join an earlier session


def scan_net(
    ctx: Context, *, now: datetime, only: str | None = None, paths: list[Path] | None = None
) -> list[SourceReport]:
    """One pass over each enabled network source (or over files given on the command line)."""
    tz = ctx.config.organisation.tz
    runs: list[tuple[str, list[NetSource]]]
    if paths:
        name = only or "files"
        runs = [(name, given_files(name, paths, tz=tz))]
    else:
        sources = [s for s in ctx.config.network.sources if s.enabled and (only is None or s.name == only)]
        if only is not None and not sources:
            raise InputError(f"no enabled network source named {only!r}", where=str(ctx.config.path))
        base, store_path = ctx.config.base, ctx.config.store.path
        runs = [(s.name, [net_source(s, base, store_path=store_path, tz=tz)]) for s in sources]
    return [
        _run(ctx, name, "net", now, partial(_scan_net, ctx, backends, now=now)) for name, backends in runs
    ]


def _scan_net(ctx: Context, backends: list[NetSource], report: SourceReport, now: datetime) -> None:
    """Read each backend, committing what it found before the next one reads."""
    classifier = ctx.classifier()
    for source in backends:
        commit_net(ctx, source.name, source.read(ctx.store, classifier, now), report, now)


def commit_net(ctx: Context, name: str, batch: NetBatch, report: SourceReport, now: datetime) -> None:
    """Count a network source's batch, commit it with its findings, then delete the files it spent."""
    report.items += batch.items
    report.skipped += batch.skipped
    if report.first_problem is None:
        report.first_problem = batch.first_problem
    if batch.files:
        _evaluate_net(ctx, name, batch, report, now)
    if batch.spent:
        # Only after the commit, else a failed commit loses them; one a crash leaves after the
        # commit is skipped by its checkpoint next time, and deleted then.
        with ctx.store.transaction():
            for _, key in batch.spent:
                ctx.store.forget_checkpoint(name, key)
        for f, _ in batch.spent:
            f.unlink(missing_ok=True)


def _evaluate_net(ctx: Context, name: str, batch: NetBatch, report: SourceReport, now: datetime) -> None:
    """Judge a batch's observations with those just before it, and commit the findings with the
    batch's checkpoints and claims in one transaction."""
    cfg = ctx.config
    matched = batch.observations
    everything = matched
    if matched:
        # Sessions are judged with what earlier scans of this source saw just before (a capture
        # rotated mid-session, a log read in two runs), and what this scan saw is kept for the next.
        oldest = min(o.first_seen or o.ts for o in matched)
        newest = max(o.last_seen or o.ts for o in matched)
        fresh = {_observation_key(o) for o in matched}
        earlier = ctx.store.recent_observations(name, since=oldest - SESSION_CONTEXT)
        everything = [o for o in earlier if _observation_key(o) not in fresh] + matched
    findings = streaming_in_class(
        everything,
        rooms=RoomIndex.build(cfg.network.rooms),
        timetable=cfg.timetable,
        tz=cfg.organisation.tz,
        thresholds=ctx.thresholds(),
        spec=ctx.policy.rules["NET-STREAMING-IN-CLASS"],
        devices=load_devices(cfg.network.devices) if cfg.network.devices else None,
    )
    with ctx.store.transaction():
        _record(ctx, findings, report, now)
        for key, state in batch.checkpoints:
            ctx.store.set_checkpoint(name, key, state, now)
        for identity in batch.claimed:
            ctx.store.finish_file(identity, owner=reader_id(ctx.store.site), now=now)
        if matched:
            ctx.store.remember_observations(name, matched)
            ctx.store.forget_observations(name, before=newest - SESSION_CONTEXT)


def _observation_key(o: NetObservation) -> tuple[str, str, str, str, datetime, str]:
    return (o.client, o.server, o.host, o.via, o.ts, o.flow or "")
