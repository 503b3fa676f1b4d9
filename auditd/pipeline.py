"""The pipeline, end to end: sources -> events -> rules -> findings -> store.

Each source runs on its own: its findings and its checkpoint are committed together, and its
failure is recorded as its health without stopping the others.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

from auditd.config import Config, FileNetSource, LiveNetSource, MailSourceConfig
from auditd.directory import People, load_devices, load_directory
from auditd.errors import AuditError, InputError, SourceError
from auditd.model import Finding, MailMessage, NetObservation
from auditd.policy import Classifier, Policy, load_policy
from auditd.rules.mail import MailRules
from auditd.rules.net import RoomIndex, Thresholds, streaming_in_class
from auditd.sources.base import mail_source
from auditd.sources.live import completed, spool_dir
from auditd.sources.mailfile import MailStats
from auditd.sources.netlogs import LogStats, Resume, checkpoint_for, detect_log, read_log, resume_point
from auditd.sources.pcap import CaptureStats, is_capture, read_capture
from auditd.store import CLAIM_LEASE, Store, file_identity, finished_log, reader_id

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


def _unavailable(kind: str, report: SourceReport) -> None:
    raise SourceError(f"the {kind} backend is not in this version of choysez-auditd yet")


# ---- network ----------------------------------------------------------------------------------


def connection(flow: str | None) -> str | None:
    """A capture flow's connection ("tcp client:port server:port"), the same in every file."""
    return flow.rpartition(" ")[0] or None if flow else None


def classify(
    observations: Iterable[NetObservation],
    classifier: Classifier,
    named: dict[str, tuple[str, str]] | None = None,
) -> Iterator[NetObservation]:
    """Fill in service and category from the lists; names the lists do not know stay null.

    A nameless flow (`via="ip"`) is a connection whose name was seen earlier (a capture file
    rotated mid-connection) when `named` maps its connection to (host, via); else it is kept only
    when its server is in a published address range, and then reads as `via="ip-range"`.
    Named flows are added to `named` as they pass.
    """
    lookup = functools.lru_cache(maxsize=1 << 16)(classifier.classify)  # logs repeat names a lot
    table = named if named is not None else {}
    for o in observations:
        conn = connection(o.flow) if named is not None and o.via != "dns" else None
        if conn is not None and o.via == "ip" and conn in table:
            host, via = table[conn]
            o = dataclasses.replace(o, host=host, via=via)
        elif conn is not None and o.via != "ip":
            table[conn] = (o.host, o.via)
        if o.via == "ip":
            by_range = classifier.classify_address(o.server)
            if by_range is not None and by_range.service is not None:
                yield dataclasses.replace(
                    o, host=o.server, via="ip-range", service=by_range.service, category=by_range.category
                )
            continue
        hit = lookup(o.host)
        if hit is not None and hit.service is not None:
            yield dataclasses.replace(o, service=hit.service, category=hit.category)
        else:
            yield o


def matches_only(classifier: Classifier) -> Callable[[str], bool]:
    """A name filter for log readers: True for names a list gives a service, each looked up once."""

    @functools.lru_cache(maxsize=1 << 16)
    def keep(host: str) -> bool:
        hit = classifier.classify(host)
        return hit is not None and hit.service is not None

    return keep


def _capture_files(pattern: str) -> list[Path]:
    p = Path(pattern)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.is_file())
    return [Path(x) for x in sorted(glob.glob(pattern)) if Path(x).is_file()]


def _file_state(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}-{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _scan_captures(
    ctx: Context, name: str, files: list[Path], report: SourceReport, now: datetime, incremental: bool
) -> None:
    classifier = ctx.classifier()
    matched: list[NetObservation] = []
    done: list[tuple[str, str]] = []
    # Connections named in earlier files or scans: a rotated capture continues them without a handshake.
    named = {
        conn: (o.host, o.via)
        for o in ctx.store.recent_observations(name, since=datetime.min.replace(tzinfo=UTC))
        if (conn := connection(o.flow)) is not None and o.via != "dns"
    }
    for f in files:
        state = _file_state(f)
        key = f"file:{f.resolve()}"
        if incremental and ctx.store.get_checkpoint(name, key) == state:
            continue
        stats = CaptureStats()
        for o in classify(read_capture(f, source=name, stats=stats), classifier, named):
            report.items += 1
            if o.service is not None:
                matched.append(o)
        report.skipped += stats.skipped
        if stats.first_skipped and report.first_problem is None:
            report.first_problem = f"{f}: {stats.first_skipped}"
        done.append((key, state))
    _evaluate_net(ctx, name, matched, done, report, now)


# Following a log: each run re-reads the last LOG_CONTEXT of what matched before (from the
# checkpoint's window offset), so that a session or a flow that straddles two runs is evaluated
# whole: Zeek's conn.log and Suricata's flow events are written when a connection ends, long after
# the name was logged, and a session needs all its observations. Findings are de-duplicated by
# fingerprint, so what the window shows again adds nothing; only lines after the checkpoint count
# as read or skipped. A session or flow longer than the window is seen only in part.
LOG_CONTEXT = timedelta(hours=2)
SESSION_CONTEXT = timedelta(hours=2)  # how far back a new observation may join an earlier session
LOG_TYPES = frozenset(("zeek", "suricata", "squid", "dnsmasq", "bind"))


def _line_start(path: Path, end: int) -> int:
    """The offset of the start of the line that ends at `end` (just after its newline)."""
    pos = max(end - 1, 0)
    with path.open("rb") as fh:
        while pos > 0:
            step = min(pos, 64 * 1024)
            fh.seek(pos - step)
            chunk = fh.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                return pos - step + nl + 1
            pos -= step
    return 0


def _read_log_part(
    ctx: Context,
    name: str,
    path: Path,
    kind: str,
    *,
    start: int,
    new_from: int,
    hold_partial: bool,
    keep: Callable[[str], bool],
    matched: list[NetObservation],
    report: SourceReport,
    now: datetime,
) -> tuple[int, int]:
    """Read `path` from `start`, keeping matched observations; (end offset, next window start)."""
    stats = LogStats(count_from=new_from)
    marks: list[tuple[datetime, int]] = []
    found = read_log(
        path,
        kind,
        source=name,
        stats=stats,
        offset=start,
        tz=ctx.config.organisation.tz,
        keep=keep,
        hold_partial=hold_partial,
    )
    for o in classify((o for o, _ in _marked(found, marks)), ctx.classifier()):
        if o.service is not None:
            matched.append(o)
    report.items += stats.lines
    report.skipped += stats.skipped
    if stats.first_skipped and report.first_problem is None:
        report.first_problem = f"{path}: {stats.first_skipped}"
    end = stats.end
    if not marks:
        return end, end
    cutoff = max(max(ts for ts, _ in marks), now) - LOG_CONTEXT
    after = [e for ts, e in marks if ts >= cutoff]
    return end, (_line_start(path, min(after)) if after else end)


def _marked(
    found: Iterable[tuple[NetObservation, int]], marks: list[tuple[datetime, int]]
) -> Iterator[tuple[NetObservation, int]]:
    for o, end in found:
        marks.append((o.last_seen or o.ts, end))
        yield o, end


def _scan_logs(
    ctx: Context,
    name: str,
    files: list[tuple[Path, str]],
    report: SourceReport,
    now: datetime,
    incremental: bool,
) -> None:
    """Like `_scan_captures`, for network logs: each file from its checkpoint (see LOG_CONTEXT)."""
    keep = matches_only(ctx.classifier())
    matched: list[NetObservation] = []
    done: list[tuple[str, str]] = []
    claimed: list[str] = []  # finished files of a folder other daemons may read too: each is read once
    for f, kind in files:
        key = f"log:{f.resolve()}"
        resume = resume_point(f, ctx.store.get_checkpoint(name, key)) if incremental else Resume()
        if resume.done:
            continue
        if incremental and finished_log(f):
            identity = file_identity(f)
            owner = reader_id(ctx.store.site)
            if not ctx.store.claim_file(
                identity, source=name, path=str(f), owner=owner, now=now, lease=CLAIM_LEASE
            ):
                continue
            claimed.append(identity)
        part = partial(_read_log_part, ctx, name, keep=keep, matched=matched, report=report, now=now)
        if resume.rotated is not None:
            part(
                resume.rotated,
                kind,
                start=resume.rotated_context,
                new_from=resume.rotated_offset,
                hold_partial=False,
            )
        end, window = part(f, kind, start=resume.context, new_from=resume.offset, hold_partial=incremental)
        done.append((key, checkpoint_for(f, end, window)))
    _evaluate_net(ctx, name, matched, done, report, now, claimed)


def _evaluate_net(
    ctx: Context,
    name: str,
    matched: list[NetObservation],
    done: list[tuple[str, str]],
    report: SourceReport,
    now: datetime,
    claimed: Sequence[str] = (),
) -> None:
    cfg = ctx.config
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
        for key, state in done:
            ctx.store.set_checkpoint(name, key, state, now)
        for identity in claimed:
            ctx.store.finish_file(identity, owner=reader_id(ctx.store.site), now=now)
        if matched:
            ctx.store.remember_observations(name, matched)
            ctx.store.forget_observations(name, before=newest - SESSION_CONTEXT)


def _observation_key(o: NetObservation) -> tuple[str, str, str, str, datetime, str]:
    return (o.client, o.server, o.host, o.via, o.ts, o.flow or "")


def _scan_paths(
    ctx: Context, name: str, kinds: list[tuple[Path, str | None]], report: SourceReport, now: datetime
) -> None:
    """Files given on the command line: network logs by what they hold, everything else as a capture
    (whose reader says what is wrong with a file that is neither)."""
    captures = [p for p, k in kinds if k is None]
    logs = [(p, k) for p, k in kinds if k is not None]
    if captures:
        _scan_captures(ctx, name, captures, report, now, incremental=False)
    if logs:
        _scan_logs(ctx, name, logs, report, now, incremental=False)


def _log_files(pattern: str, kind: str) -> list[tuple[Path, str]]:
    """The files of a log source that are logs of its type (a Zeek folder also holds other files)."""
    return [(f, kind) for f in _capture_files(pattern) if detect_log(f) == kind]


def scan_net(
    ctx: Context, *, now: datetime, only: str | None = None, paths: list[Path] | None = None
) -> list[SourceReport]:
    if paths:
        name = only or "files"
        kinds = [(p, None if is_capture(p) else detect_log(p)) for p in paths]
        return [_run(ctx, name, "net", now, partial(_scan_paths, ctx, name, kinds, now=now))]
    sources = [s for s in ctx.config.network.sources if s.enabled and (only is None or s.name == only)]
    if only is not None and not sources:
        raise InputError(f"no enabled network source named {only!r}", where=str(ctx.config.path))
    reports = []
    for src in sources:
        if isinstance(src, FileNetSource) and src.type == "pcap":
            pattern = src.resolved(ctx.config.base)

            def body(r: SourceReport, s: FileNetSource = src, pattern: str = pattern) -> None:
                files = _capture_files(pattern)
                if not files:
                    raise SourceError(f"no capture files match {pattern}")
                _scan_captures(ctx, s.name, files, r, now, incremental=True)

            reports.append(_run(ctx, src.name, "net", now, body))
        elif isinstance(src, FileNetSource) and src.type in LOG_TYPES:
            pattern = src.resolved(ctx.config.base)

            def log_body(r: SourceReport, s: FileNetSource = src, pattern: str = pattern) -> None:
                files = _log_files(pattern, s.type)
                if not files:
                    raise SourceError(f"no {s.type} logs match {pattern}")
                _scan_logs(ctx, s.name, files, r, now, incremental=True)

            reports.append(_run(ctx, src.name, "net", now, log_body))
        elif isinstance(src, LiveNetSource):
            reports.append(_run(ctx, src.name, "net", now, partial(_scan_spool, ctx, src, now=now)))
        else:
            reports.append(_run(ctx, src.name, "net", now, partial(_unavailable, src.type)))
    return reports


def _scan_spool(ctx: Context, src: LiveNetSource, report: SourceReport, now: datetime) -> None:
    """Read the live source's completed capture files, then delete them: a spool, not an archive."""
    files = completed(spool_dir(src, ctx.config.store.path))
    if files:
        _scan_captures(ctx, src.name, files, report, now, incremental=True)
    with ctx.store.transaction():
        for f in files:
            ctx.store.forget_checkpoint(src.name, f"file:{f.resolve()}")
    for f in files:
        f.unlink(missing_ok=True)
