"""The `choysez-auditd` command: a thin layer over the library.

Exit status: 0 success; 2 bad usage, invalid config or unreadable input (one line on stderr
naming the file and the place); 1 any other failure.

Each command imports the modules it uses when it runs (those above `if TYPE_CHECKING` are light):
`inspect` on a capture or a log then starts in under 0.1 s, without pydantic, the store or mail.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from auditd import __version__
from auditd.classifier import Classifier, classify, load_classifier, matches_only
from auditd.errors import AuditError, InputError, PermissionDenied, UsageError
from auditd.locations import config_path
from auditd.model import Approval, JSONValue, NetObservation, Status, StoredFinding, Subject
from auditd.progress import FileProgress
from auditd.sources import detect

if TYPE_CHECKING:
    from auditd.config import Config
    from auditd.digest.render import DigestData
    from auditd.pipeline import SourceReport
    from auditd.policy import Policy
    from auditd.rules.mail import MailRules
    from auditd.sources.base import MailSource
    from auditd.sources.logio import LogStats
    from auditd.store import Store

PROG = "choysez-auditd"
SUBJECT_KEYS = ("staff", "address", "room", "device", "service")


def now_utc() -> datetime:
    return datetime.now(UTC)


# ---- parsing helpers --------------------------------------------------------------------------


def parse_subject(text: str) -> Subject:
    """`staff:EMAIL`, `address:EMAIL`, `room:NAME`, `device:IP-or-MAC`, optionally `,service:NAME`."""
    parts: dict[str, str] = {}
    for piece in text.split(","):
        key, sep, value = piece.partition(":")
        key, value = key.strip().lower(), value.strip()
        if not sep or key not in SUBJECT_KEYS or not value:
            raise UsageError(
                f"--subject {text!r}: each part must be KEY:VALUE with KEY one of {', '.join(SUBJECT_KEYS)}"
            )
        if key in parts:
            raise UsageError(f"--subject {text!r}: {key} given twice")
        parts[key] = value.lower() if key in ("staff", "address", "device") else value
    return Subject(**parts)


def parse_when(text: str, tz: Any, *, end_of_day: bool = False) -> datetime:
    """ISO date or date-time; a time without offset is in the organisation's time zone."""
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            t = time(0, 0)
            moment = datetime.combine(d + timedelta(days=1) if end_of_day else d, t, tz)
        else:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=tz)
    except ValueError:
        raise UsageError(f"not a date or date-time (YYYY-MM-DD or YYYY-MM-DDTHH:MM): {text!r}") from None
    return moment.astimezone(UTC)


def _load(args: argparse.Namespace) -> Config:
    from auditd.config import config_path, load_config

    return load_config(config_path(args.config))


def _store(config: Config) -> Store:
    from auditd.store import Store

    return Store.connect(config)


def _out(line: str = "", stream: TextIO | None = None) -> None:
    print(line, file=stream or sys.stdout, flush=True)


# ---- findings as data -------------------------------------------------------------------------


def finding_json(f: StoredFinding) -> dict[str, JSONValue]:
    return {
        "id": f.id,
        "rule": f.rule,
        "clauses": list(f.clauses),
        "severity": f.severity.value,
        "status": f.status.value,
        "subject": dict(f.subject.as_dict()),
        "first_seen": f.first_seen.isoformat(),
        "last_seen": f.last_seen.isoformat(),
        "occurrences": f.occurrences,
        "pupil_involved": f.pupil_involved,
        "reasons": list(f.reasons),
        "evidence": [
            {"key": e.key, "observed_at": e.observed_at.isoformat(), **dict(e.data)} for e in f.evidence
        ],
        "approval_id": f.approval_id,
        "created_at": f.created_at.isoformat(),
        "reviewed_by": f.reviewed_by,
        "review_note": f.review_note,
    }


def _approval_json(a: Approval) -> dict[str, JSONValue]:
    return {
        "id": a.id,
        "rule": a.rule,
        "subject": dict(a.subject.as_dict()),
        "valid_from": a.valid_from.isoformat(),
        "valid_until": a.valid_until.isoformat(),
        "approved_by": a.approved_by,
        "reason": a.reason,
        "granted_at": a.granted_at.isoformat(),
        "revoked_at": a.revoked_at.isoformat() if a.revoked_at else None,
        "revoked_by": a.revoked_by,
        "revoke_reason": a.revoke_reason,
    }


def csv_cell(value: object) -> str:
    """A cell a spreadsheet will not run: formulas from hostile input are defused with a quote."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _subject_text(s: Subject) -> str:
    return ", ".join(f"{k}:{v}" for k, v in s.as_dict().items())


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


# ---- commands ---------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from auditd.directory import load_devices, load_directory
    from auditd.policy import load_policy

    config = _load(args)
    policy = load_policy(config.policy.dir)
    people = load_directory(config)
    if config.network.devices:
        load_devices(config.network.devices)
    _out(f"config: {config.path} ok")
    _out(f"policy: {policy.folder} ok ({len(policy.rules)} rules, {len(policy.streaming.service)} services)")
    _out(f"directory: {len(people.staff)} staff, {len(people.community)} community members")
    if args.offline:
        return 0
    failures = 0
    for name, problem in _probe_sources(config):
        _out(f"source {name}: {'ok' if problem is None else 'FAILED: ' + problem}")
        failures += problem is not None
    return 1 if failures else 0


def _probe_sources(config: Config) -> list[tuple[str, str | None]]:
    from auditd.config import FileNetSource
    from auditd.sources.base import mail_source

    results: list[tuple[str, str | None]] = []
    for src in config.mail.sources:
        problem: str | None = None
        try:
            mail_source(src, config.base).probe()
        except AuditError as exc:
            problem = exc.message
        results.append((src.name, problem))
    for net in config.network.sources:
        if isinstance(net, FileNetSource):
            from glob import glob

            pattern = net.resolved(config.base)
            problem = None if glob(pattern) or Path(pattern).is_dir() else f"nothing matches {pattern}"
        else:
            problem = "live capture is not in this version yet"
        results.append((net.name, problem))
    return results


def _optional_config(args: argparse.Namespace) -> Config | None:
    path = config_path(args.config)
    if args.config is None and not path.exists():
        return None  # inspect works without a config: the bundled policy classifies names
    from auditd.config import load_config

    return load_config(path)


def net_json(o: NetObservation) -> dict[str, JSONValue]:
    return {
        "kind": "net",
        "ts": o.ts.isoformat(),
        "client": o.client,
        "server": o.server,
        "host": o.host,
        "via": o.via,
        "service": o.service,
        "category": o.category,
        "bytes": o.bytes,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    config = _optional_config(args)
    rules: MailRules | None = None
    if config is None:  # the bundled policy's classifier: validated once, then cached
        classifier = load_classifier(None)
    else:
        from auditd.policy import load_policy

        policy = load_policy(config.policy.dir)
        cats = config.network.categories
        classifier = policy.classifier(set(cats) if cats is not None else None)
        rules = _mail_rules(config, policy)
    now = now_utc()
    emit = _emitter(args.format)
    # A bar on the terminal while a large file is read, when the lines themselves go elsewhere.
    show_progress = not sys.stdout.isatty()
    for raw in args.paths:
        path = Path(raw)
        kind = detect(path)
        if kind.startswith("log:"):
            from functools import partial

            from auditd import parallel

            ranges = parallel.plan(path, kind[4:])
            if len(ranges) > 1:  # a big log: one process per range, output as one process would write it
                work = partial(
                    _inspect_log, path, kind[4:], classifier, emit, args.only_matches, config, args.format
                )
                with (
                    parallel.Workers(path, ranges, work) as team,
                    FileProgress(path, sys.stderr, enabled=show_progress, done=team.done),
                ):
                    _report_skipped(path, team.finish(work(*ranges[0])))
                continue
        with FileProgress(path, sys.stderr, enabled=show_progress):
            _inspect_path(path, kind, args, classifier, rules, emit, config, now)
    return 0


def _inspect_path(
    path: Path,
    kind: str,
    args: argparse.Namespace,
    classifier: Classifier,
    rules: MailRules | None,
    emit: Callable[[dict[str, JSONValue]], None],
    config: Config | None,
    now: datetime,
) -> None:
    if kind == "capture":
        from auditd.sources.pcap import CaptureStats, read_capture

        stats = CaptureStats()
        for o in classify(read_capture(path, source=str(path), stats=stats), classifier):
            if args.only_matches and o.service is None:
                continue
            emit(net_json(o))
        if stats.skipped or stats.truncated:
            cut = " (file is truncated)" if stats.truncated else ""
            _out(
                f"{PROG}: {path}: {stats.skipped} packets skipped{cut}"
                + (f"; first: {stats.first_skipped}" if stats.first_skipped else ""),
                sys.stderr,
            )
    elif kind.startswith("log:"):
        _report_skipped(
            path, _inspect_log(path, kind[4:], classifier, emit, args.only_matches, config, args.format)
        )
    else:
        from auditd.sources.mailfile import EmlFiles, MaildirFolder, MailStats, MboxFile

        mstats = MailStats()
        reader: MailSource = (
            MaildirFolder(str(path), path)
            if kind == "maildir"
            else MboxFile(str(path), path)
            if kind == "mbox"
            else EmlFiles(str(path), path)
        )
        messages = (m for m, _ in reader.read({}, mstats) if m is not None)
        for msg in messages:
            findings = rules.evaluate(msg, now=now) if rules else []
            if args.only_matches and not findings:
                continue
            emit(
                {
                    "kind": "mail",
                    "source": msg.source,
                    "message_id": msg.message_id,
                    "date": msg.date.isoformat() if msg.date else None,
                    "from": msg.sender.email if msg.sender else None,
                    "to": [a.email for a in msg.to],
                    "cc": [a.email for a in msg.cc],
                    "findings": [
                        {
                            "rule": f.rule,
                            "staff": f.subject.staff,
                            "personal_address": f.subject.address,
                            "pupil_involved": f.pupil_involved,
                            "reasons": list(f.reasons),
                            "confidence": f.evidence[0].data.get("confidence") if f.evidence else None,
                        }
                        for f in findings
                    ],
                }
            )
        if mstats.unparseable:
            _out(
                f"{PROG}: {path}: {mstats.unparseable} messages unparseable; first: {mstats.first_problem}",
                sys.stderr,
            )


def _inspect_log(
    path: Path,
    kind: str,
    classifier: Classifier,
    emit: Callable[[dict[str, JSONValue]], None],
    only_matches: bool,
    config: Config | None,
    fmt: str = "table",
    offset: int = 0,
    stop: int | None = None,
) -> LogStats:
    """One network log (the lines starting in [offset, stop)) through the classifier; with
    --only-matches, unlisted names are never built.

    The hot path of a big log: each distinct name is classified once, and JSON lines are written
    from cached pieces (the same text `json.dumps(net_json(o), ensure_ascii=False)` gives, see
    `logscan.log_jsonl`).
    """
    from auditd.sources.netlogs import LogStats, read_log

    stats = LogStats()
    keep = matches_only(classifier) if only_matches else None
    tz = config.organisation.tz if config else UTC
    records: Iterator[tuple[datetime, str, str, str, int | None]]
    if fmt == "jsonl" and kind == "squid":  # straight from each line's fields: no observation per line
        from auditd.sources.squid import squid_records

        squid = squid_records(path, stats=stats, offset=offset, keep=keep, stop=stop)
        records = ((ts, client, server, host, size) for (ts, _, client, server, host, size), _, _ in squid)
    else:
        logged = read_log(
            path, kind, source=str(path), stats=stats, offset=offset, tz=tz, keep=keep, stop=stop
        )
        if fmt != "jsonl":
            for o in classify((o for o, _ in logged), classifier):
                if not (only_matches and o.service is None):
                    emit(net_json(o))
            return stats
        records = ((o.ts, o.client, o.server, o.host, o.bytes) for o, _ in logged)
    from auditd.sources.logscan import log_jsonl  # a big log's hot path: compiled, pieces cached per name

    log_jsonl(records, classifier.classify, only_matches, sys.stdout.write)
    return stats


def _report_skipped(path: Path, stats: LogStats) -> None:
    if stats.skipped:
        _out(f"{PROG}: {path}: {stats.skipped} lines skipped; first: {stats.first_skipped}", sys.stderr)


def _emitter(fmt: str) -> Callable[[dict[str, JSONValue]], None]:
    if fmt == "jsonl":

        def line(obj: dict[str, JSONValue]) -> None:
            # Block-buffered when piped: a flush per line would cost more than the parsing.
            sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")

        return line

    def table_row(obj: dict[str, JSONValue]) -> None:
        if obj["kind"] == "net":
            svc = obj["service"] or "-"
            _out(f"{obj['ts']}  {obj['client']:<39} {obj['via']:<9} {svc:<12} {obj['host']}")
        else:
            found = obj["findings"]
            rules = (
                ",".join(str(f["rule"]) for f in found if isinstance(f, dict))
                if isinstance(found, list)
                else ""
            )
            rules = rules or "-"
            _out(f"{obj['date'] or '-':<25} {obj['from'] or '-':<40} {rules}")

    return table_row


def _mail_rules(config: Config, policy: Policy) -> MailRules:
    from auditd.directory import load_directory
    from auditd.rules.mail import MailRules

    return MailRules(
        load_directory(config), policy, config.organisation.is_official, config.mail.business_threshold
    )


def _print_reports(reports: list[SourceReport]) -> int:
    for r in reports:
        if r.ok:
            rules = ", ".join(f"{k} {v}" for k, v in sorted(r.rules.items())) or "none"
            line = f"{r.name}: {r.items} items read, {r.new} new findings (matched: {rules})"
            if r.skipped:
                line += f", {r.skipped} skipped (first: {r.first_problem})"
            _out(line)
        else:
            _out(f"{r.name}: FAILED: {r.error}", sys.stderr)
    return 0 if all(r.ok for r in reports) else 1


def cmd_scan(args: argparse.Namespace) -> int:
    from auditd.pipeline import Context, scan_mail, scan_net

    config = _load(args)
    with _store(config) as store:
        ctx = Context.load(config, store)
        if args.what == "mail":
            reports = scan_mail(ctx, now=now_utc(), only=args.source)
        else:
            paths = [Path(p) for p in args.paths]
            for p in paths:
                if not p.exists():
                    raise InputError("no such file", where=str(p))
            reports = scan_net(ctx, now=now_utc(), only=args.source, paths=paths or None)
    return _print_reports(reports)


def cmd_findings(args: argparse.Namespace) -> int:
    from auditd.policy import RULE_IDS

    config = _load(args)
    tz = config.organisation.tz
    with _store(config) as store:
        if args.action in ("confirm", "dismiss"):
            if not config.people.may_review(args.by):
                raise PermissionDenied(
                    f"{args.by} may not review findings (only the ICT manager {config.people.ict_manager} "
                    f"or the DSL {config.people.dsl})"
                )
            status = Status.CONFIRMED if args.action == "confirm" else Status.DISMISSED
            note = args.note if args.action == "confirm" else args.reason
            f = store.review(args.id, status, by=args.by.lower(), note=note, now=now_utc())
            _out(f"finding #{f.id} {f.status.value} by {f.reviewed_by}")
            return 0
        if args.rule and args.rule not in RULE_IDS:
            raise UsageError(f"--rule {args.rule!r}: not a rule id ({', '.join(RULE_IDS)})")
        query = {
            "since": parse_when(args.since, tz) if args.since else None,
            "rule": args.rule,
            "status": Status(args.status) if args.status else None,
            "subject": parse_subject(args.subject) if args.subject else None,
        }
        approvals = {a.id: a for a in store.list_approvals()}
        if args.format == "json":
            _write_json_findings(store.iter_findings(**query, with_evidence=True), approvals)
        elif args.format == "csv":
            _write_csv_findings(store.iter_findings(**query))
        else:
            _write_table_findings(store.iter_findings(**query), tz)
    return 0


def _write_json_findings(found: Iterator[StoredFinding], approvals: dict[int, Approval]) -> None:
    """A JSON array written as it is read, one finding a line: a million never sit in memory at once.

    Compact lines use the C encoder; an indented dump goes through the pure-Python one, 5x slower.
    """
    out = sys.stdout
    out.write("[")
    for n, f in enumerate(found):
        # each finding with the approval that covers it, in full (who approved it, when and why)
        approval = _approval_json(approvals[f.approval_id]) if f.approval_id in approvals else None
        out.write(
            ("," if n else "")
            + "\n"
            + json.dumps({**finding_json(f), "approval": approval}, ensure_ascii=False)
        )
    out.write("\n]\n")


CSV_HEADER = (
    "id",
    "rule",
    "clauses",
    "severity",
    "status",
    "subject",
    "first_seen",
    "last_seen",
    "occurrences",
    "pupil_involved",
    "approval_id",
    "reasons",
)


def _write_csv_findings(found: Iterator[StoredFinding]) -> None:
    w = csv.writer(sys.stdout)
    w.writerow(CSV_HEADER)
    for f in found:
        w.writerow(
            [
                csv_cell(v)
                for v in (
                    f.id,
                    f.rule,
                    " ".join(f.clauses),
                    f.severity.value,
                    f.status.value,
                    _subject_text(f.subject),
                    f.first_seen.isoformat(),
                    f.last_seen.isoformat(),
                    f.occurrences,
                    f.pupil_involved,
                    f.approval_id or "",
                    "; ".join(f.reasons),
                )
            ]
        )


TABLE_SAMPLE = 1000  # rows that set the column widths; the rest stream with those widths


def _write_table_findings(found: Iterator[StoredFinding], tz: Any) -> None:
    """A table that streams: a million findings print without being held in memory."""
    header = ["ID", "RULE", "STATUS", "SEV", "SUBJECT", "FIRST SEEN", "N", "PUPIL"]

    def row(f: StoredFinding) -> list[str]:
        return [
            str(f.id),
            f.rule,
            f.status.value,
            f.severity.value,
            _subject_text(f.subject),
            f.first_seen.astimezone(tz).strftime("%Y-%m-%d %H:%M"),
            str(f.occurrences),
            "yes" if f.pupil_involved else "",
        ]

    first = [row(f) for f in itertools.islice(found, TABLE_SAMPLE)]
    widths = [max(len(h), *(len(r[i]) for r in first)) if first else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    write = sys.stdout.write
    write(fmt.format(*header).rstrip() + "\n" + fmt.format(*("-" * w for w in widths)).rstrip() + "\n")
    count = 0
    for r in itertools.chain(first, (row(f) for f in found)):
        write(fmt.format(*r).rstrip() + "\n")
        count += 1
    _out(f"{count} finding{'s' if count != 1 else ''}")


def cmd_approvals(args: argparse.Namespace) -> int:
    from auditd.policy import RULE_IDS

    config = _load(args)
    tz = config.organisation.tz
    with _store(config) as store:
        if args.action == "grant":
            if args.rule not in RULE_IDS:
                raise UsageError(f"--rule {args.rule!r}: not a rule id ({', '.join(RULE_IDS)})")
            if not config.people.may_approve(args.approved_by):
                raise PermissionDenied(
                    f"{args.approved_by} may not approve exceptions (only the centre manager "
                    f"{config.people.centre_manager} or a listed deputy)"
                )
            if not args.reason.strip():
                raise UsageError("--reason must say why")
            a, n = store.grant_approval(
                rule=args.rule,
                subject=parse_subject(args.subject),
                valid_from=parse_when(getattr(args, "from"), tz),
                valid_until=parse_when(args.until, tz, end_of_day=True),
                approved_by=args.approved_by.lower(),
                reason=args.reason.strip(),
                now=now_utc(),
            )
            _out(
                f"approval #{a.id} granted: {a.rule} for {_subject_text(a.subject)}, "
                f"{a.valid_from.astimezone(tz):%Y-%m-%d %H:%M} to "
                f"{a.valid_until.astimezone(tz):%Y-%m-%d %H:%M}; "
                f"{n} existing finding{'s' if n != 1 else ''} now approved"
            )
            return 0
        if args.action == "revoke":
            if not config.people.may_approve(args.by):
                raise PermissionDenied(
                    f"{args.by} may not revoke approvals (only the centre manager or a deputy)"
                )
            a, n = store.revoke_approval(args.id, by=args.by.lower(), reason=args.reason, now=now_utc())
            _out(f"approval #{a.id} revoked; {n} finding{'s' if n != 1 else ''} reopened")
            return 0
        approvals = store.list_approvals(active_at=now_utc() if args.active else None)
    if args.format == "json":
        _out(
            json.dumps(
                [
                    {
                        "id": a.id,
                        "rule": a.rule,
                        "subject": a.subject.as_dict(),
                        "valid_from": a.valid_from.isoformat(),
                        "valid_until": a.valid_until.isoformat(),
                        "approved_by": a.approved_by,
                        "reason": a.reason,
                        "granted_at": a.granted_at.isoformat(),
                        "revoked_at": a.revoked_at.isoformat() if a.revoked_at else None,
                        "revoked_by": a.revoked_by,
                        "revoke_reason": a.revoke_reason,
                        "active": a.is_active(now_utc()),
                    }
                    for a in approvals
                ],
                indent=2,
            )
        )
    else:
        rows = [
            [
                str(a.id),
                a.rule,
                _subject_text(a.subject),
                f"{a.valid_from.astimezone(tz):%Y-%m-%d %H:%M}",
                f"{a.effective_until.astimezone(tz):%Y-%m-%d %H:%M}",
                a.approved_by,
                "revoked" if a.revoked_at else ("active" if a.is_active(now_utc()) else "inactive"),
                a.reason,
            ]
            for a in approvals
        ]
        _out(_table(rows, ["ID", "RULE", "SUBJECT", "FROM", "UNTIL", "BY", "STATE", "REASON"]))
    return 0


def build_digest(config: Config, store: Store, policy: Policy, day: date, now: datetime) -> DigestData:
    """The ICT manager's digest for `day` (what was recorded from day-1 to day at `[digest] time`)."""
    from auditd.digest.send import collect

    return collect(config, store, policy, day, now)


def cmd_digest(args: argparse.Namespace) -> int:
    from auditd.digest.render import render_html, render_text
    from auditd.digest.send import SmtpSettings, current_day, deliver_day, latest_due_day
    from auditd.policy import load_policy

    config = _load(args)
    policy = load_policy(config.policy.dir)
    now = now_utc()
    at, tz = config.digest.at, config.organisation.tz
    try:
        given = date.fromisoformat(args.date) if args.date else None
    except ValueError:
        raise UsageError(f"--date {args.date!r}: not a date (YYYY-MM-DD)") from None
    if args.send:
        day = given or latest_due_day(now, at, tz)
        settings = SmtpSettings.from_config(config)
        with _store(config) as store:
            outcomes = deliver_day(config, store, policy, day, now, settings.send)
        for o in outcomes:
            if o.status == "skipped":
                _out(f"digest for {day} to {o.recipient}: already sent (sent once only)")
            elif o.status == "sent":
                _out(f"digest for {day} sent to {o.recipient}")
            else:
                failed = f"FAILED (attempt {o.attempts}): {o.error}"
                _out(f"digest for {day} to {o.recipient}: {failed}", sys.stderr)
        return 1 if any(o.status == "failed" for o in outcomes) else 0
    # Without --date: the digest being filled now, as it stands (it goes out at [digest] time).
    day = given or current_day(now, at, tz)
    with _store(config) as store:
        data = build_digest(config, store, policy, day, now)
    text = render_html(data) if args.format == "html" else render_text(data)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        _out(f"digest for {day} written to {out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from auditd.config import config_path
    from auditd.daemon import run_daemon

    return run_daemon(config_path(args.config), digest_now=args.digest_now)


def cmd_purge(args: argparse.Namespace) -> int:
    """The daemon's daily retention purge, on demand."""
    from auditd.daemon import purge_store

    config = _load(args)
    with _store(config) as store:
        result = purge_store(config, store, now_utc())
    _out(
        f"purged {result.findings} findings (with their evidence), {result.runs} run records, "
        f"{result.checkpoints} checkpoints and {result.audit} audit entries older than "
        f"{config.store.retention_days} days ({config.store.audit_retention_days} for the audit log)"
    )
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    """Capture a live source's interface into its spool until stopped (the capture unit's job)."""
    import signal
    import threading

    from auditd.config import LiveNetSource
    from auditd.sources.live import capture, spool_dir

    config = _load(args)
    live = [s for s in config.network.sources if isinstance(s, LiveNetSource)]
    chosen = [s for s in live if args.source in (None, s.name)]
    if not chosen:
        raise UsageError(
            f"no live network source{' named ' + repr(args.source) if args.source else ''} in {config.path}"
        )
    if len(chosen) > 1:
        raise UsageError("several live sources: name one with --source")
    src = chosen[0]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    spool = spool_dir(src, config.store.path)
    total = capture(
        src,
        spool,
        stop=stop,
        duration=args.duration,
        on_file=lambda p, n: _out(f"{p.name}: {n} packets"),
        on_ready=lambda: _out(f"{src.name}: capturing on {src.interface} ({src.bpf}) into {spool}"),
    )
    _out(f"{src.name}: {total} packets captured")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from auditd.demo import run_demo

    return run_demo(
        Path(args.config) if args.config else None, Path(args.out) if args.out else None, now_utc()
    )


def cmd_store(args: argparse.Namespace) -> int:
    """Upgrades and backups: opening the store migrates it (keeping a `.vN.bak` copy first)."""
    config = _load(args)
    with _store(config) as store:
        if args.action == "backup":
            dest = Path(args.dest)
            if dest.exists():
                raise UsageError(f"{dest} exists; give a new file name")
            store.backup(dest)
            _out(f"store {store.path} (schema v{store.schema_version}) copied to {dest}")
        else:
            _out(f"store {store.path} is at schema v{store.schema_version}")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    """Serve the review console until SIGTERM or Ctrl-C."""
    import signal
    import threading

    from auditd.config import Console, _is_loopback
    from auditd.console import serve_console

    config = _load(args)
    console = config.console or Console()
    host = args.host or console.host
    if not console.cookie_secure and not _is_loopback(host):
        raise UsageError(f"--host {host}: cookie_secure = false is only allowed on a loopback host")
    if console.auth == "local":
        with _store(config) as store:
            if not store.list_users():
                _out(
                    f"{PROG}: no console accounts yet: add one with `{PROG} users add EMAIL --role ROLE`",
                    sys.stderr,
                )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def ready(h: str, p: int) -> None:
        shown = f"[{h}]" if ":" in h else h
        _out(f"console listening on http://{shown}:{p}/ (auth: {console.auth})")

    serve_console(config, stop, host=host, port=args.port, on_ready=ready)
    return 0


def _read_new_password(args: argparse.Namespace) -> str:
    import getpass

    from auditd.console.auth import check_new_password

    if args.password_file:
        path = Path(args.password_file)
        try:
            password = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise InputError(f"cannot read the password: {exc.strerror}", where=str(path)) from None
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != password:
            raise UsageError("the two passwords differ")
    problem = check_new_password(password)
    if problem:
        raise UsageError(problem)
    return password


def cmd_users(args: argparse.Namespace) -> int:
    import getpass

    from auditd.config import check_email
    from auditd.console.auth import Role, hash_password

    config = _load(args)
    actor = f"cli:{getpass.getuser()}"
    with _store(config) as store:
        if args.action == "add":
            try:
                email = check_email(args.email)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            role = Role(args.role)
            hashed = None if args.no_password else hash_password(_read_new_password(args))
            store.add_user(email, role.value, hashed, by=actor, now=now_utc())
            _out(f"user {email} added as {role.value}")
            people = config.people
            if role == Role.CENTRE_MANAGER and not people.may_approve(email):
                _out(
                    f"note: {email} is not the configured centre manager or a deputy: they will see "
                    "approvals but may not grant or revoke them"
                )
            if role in (Role.ICT_MANAGER, Role.DSL) and not people.may_review(email):
                _out(
                    f"note: {email} is not the configured ICT manager or DSL: they will see findings but "
                    "may not confirm or dismiss them"
                )
            return 0
        if args.action == "remove":
            store.remove_user(args.email, by=actor, now=now_utc())
            _out(f"user {args.email.strip().lower()} removed")
            return 0
        users = store.list_users()
    tz = config.organisation.tz
    rows = [
        [
            u.email,
            u.role,
            "password" if u.password_hash else "proxy only",
            f"{u.last_signin.astimezone(tz):%Y-%m-%d %H:%M}" if u.last_signin else "never",
            f"{u.locked_until.astimezone(tz):%Y-%m-%d %H:%M}"
            if u.locked_until and u.locked_until > now_utc()
            else "",
        ]
        for u in users
    ]
    _out(_table(rows, ["EMAIL", "ROLE", "SIGN-IN", "LAST SIGN-IN", "LOCKED UNTIL"]))
    return 0


# ---- the parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="config file (else $CHOYSEZ_AUDITD_CONFIG, else /etc/choysez-auditd/config.toml)",
    )
    p = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description="Audit Choysez mail and classroom traffic against the social media policy.",
    )
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", parents=[common], help="run the whole pipeline on the bundled sample school"
    )
    demo.add_argument(
        "--out", metavar="DIR", help="where to write the digest (default: the sample school's out/)"
    )
    demo.set_defaults(func=cmd_demo)

    check = sub.add_parser("check", parents=[common], help="validate config, policies and directories")
    check.add_argument("--offline", action="store_true", help="do not try to reach the sources")
    check.set_defaults(func=cmd_check)

    ins = sub.add_parser("inspect", parents=[common], help="classify files without storing anything")
    ins.add_argument("paths", nargs="+", metavar="PATH")
    ins.add_argument("--format", choices=["jsonl", "table"], default="jsonl")
    ins.add_argument("--only-matches", action="store_true", help="only lines that match a service or a rule")
    ins.set_defaults(func=cmd_inspect)

    scan = sub.add_parser("scan", parents=[common], help="one pass over the configured sources")
    scan_sub = scan.add_subparsers(dest="what", required=True, metavar="mail|net")
    sm = scan_sub.add_parser("mail", parents=[common], help="scan mail sources (incremental)")
    sm.add_argument("--source", metavar="NAME")
    sn = scan_sub.add_parser("net", parents=[common], help="scan network sources, or the given files")
    sn.add_argument("--source", metavar="NAME")
    sn.add_argument("paths", nargs="*", metavar="PATH")
    scan.set_defaults(func=cmd_scan)

    cap = sub.add_parser(
        "capture",
        parents=[common],
        help="capture a live source's interface into its spool (needs CAP_NET_RAW)",
    )
    cap.add_argument("--source", metavar="NAME", help="the live source (needed when there are several)")
    cap.add_argument(
        "--duration", type=float, metavar="SECONDS", help="stop after this long (default: run until stopped)"
    )
    cap.set_defaults(func=cmd_capture)

    fnd = sub.add_parser("findings", parents=[common], help="list, confirm or dismiss findings")
    fnd.add_argument("--since", metavar="DATE")
    fnd.add_argument("--rule", metavar="ID")
    fnd.add_argument("--status", choices=[s.value for s in Status])
    fnd.add_argument("--subject", metavar="SUBJECT", help="e.g. staff:jane.smith@choysez.org.uk")
    fnd.add_argument("--format", choices=["table", "json", "csv"], default="table")
    fnd.set_defaults(func=cmd_findings, action="list")
    fsub = fnd.add_subparsers(dest="action", metavar="confirm|dismiss")
    conf = fsub.add_parser("confirm", parents=[common], help="confirm a finding after review")
    conf.add_argument("id", type=int)
    conf.add_argument("--by", required=True, metavar="EMAIL")
    conf.add_argument("--note", metavar="TEXT")
    dis = fsub.add_parser("dismiss", parents=[common], help="dismiss a finding, with the reason")
    dis.add_argument("id", type=int)
    dis.add_argument("--by", required=True, metavar="EMAIL")
    dis.add_argument("--reason", required=True, metavar="TEXT")

    apr = sub.add_parser("approvals", parents=[common], help="grant, revoke or list approved exceptions")
    asub = apr.add_subparsers(dest="action", required=True, metavar="grant|revoke|list")
    gr = asub.add_parser("grant", parents=[common], help="grant an exception (centre manager or deputy)")
    gr.add_argument("--rule", required=True, metavar="ID")
    gr.add_argument("--subject", required=True, metavar="SUBJECT")
    gr.add_argument("--from", required=True, metavar="DATETIME")
    gr.add_argument("--until", required=True, metavar="DATETIME")
    gr.add_argument("--approved-by", required=True, metavar="EMAIL")
    gr.add_argument("--reason", required=True, metavar="TEXT")
    rv = asub.add_parser("revoke", parents=[common], help="revoke an approval")
    rv.add_argument("id", type=int)
    rv.add_argument("--by", required=True, metavar="EMAIL")
    rv.add_argument("--reason", required=True, metavar="TEXT")
    ls = asub.add_parser("list", parents=[common], help="list approvals")
    ls.add_argument("--active", action="store_true")
    ls.add_argument("--format", choices=["table", "json"], default="table")
    apr.set_defaults(func=cmd_approvals)

    dg = sub.add_parser("digest", parents=[common], help="write or send the daily digest")
    dg.add_argument("--date", metavar="YYYY-MM-DD")
    mode = dg.add_mutually_exclusive_group()
    mode.add_argument("--send", action="store_true")
    mode.add_argument("--output", metavar="FILE")
    dg.add_argument("--format", choices=["html", "text"], default="text")
    dg.set_defaults(func=cmd_digest)

    run = sub.add_parser("run", parents=[common], help="the daemon: scheduled scans, digest, retention")
    run.add_argument(
        "--digest-now", action="store_true", help="send today's digest once the first scans are done"
    )
    run.set_defaults(func=cmd_run)

    pg = sub.add_parser("purge", parents=[common], help="delete what is older than the retention now")
    pg.set_defaults(func=cmd_purge)

    st = sub.add_parser("store", parents=[common], help="migrate or back up the findings store")
    stsub = st.add_subparsers(dest="action", required=True, metavar="migrate|backup")
    stsub.add_parser("migrate", parents=[common], help="bring the store to this version's schema")
    bk = stsub.add_parser("backup", parents=[common], help="a consistent copy, safe while the daemon runs")
    bk.add_argument("dest", metavar="FILE")
    st.set_defaults(func=cmd_store)

    con = sub.add_parser("console", parents=[common], help="the review console in the browser")
    con.add_argument("--host", metavar="ADDRESS", help="listen address (default [console] host, 127.0.0.1)")
    con.add_argument(
        "--port", type=int, metavar="PORT", help="default [console] port, 8765; 0 picks a free one"
    )
    con.set_defaults(func=cmd_console)

    us = sub.add_parser("users", parents=[common], help="the review console's accounts")
    ussub = us.add_subparsers(dest="action", required=True, metavar="add|remove|list")
    ua = ussub.add_parser("add", parents=[common], help="add an account (asks for the password twice)")
    ua.add_argument("email", metavar="EMAIL")
    ua.add_argument("--role", required=True, choices=["ict-manager", "centre-manager", "dsl", "viewer"])
    pw = ua.add_mutually_exclusive_group()
    pw.add_argument(
        "--password-file", metavar="FILE", help="read the password from FILE (without its final newline)"
    )
    pw.add_argument(
        "--no-password", action="store_true", help="an account that signs in only through the reverse proxy"
    )
    ur = ussub.add_parser("remove", parents=[common], help="remove an account and end its sessions")
    ur.add_argument("email", metavar="EMAIL")
    ussub.add_parser("list", parents=[common], help="list accounts")
    us.set_defaults(func=cmd_users)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "config"):
        args.config = None
    try:
        result: int = args.func(args)
        return result
    except AuditError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
