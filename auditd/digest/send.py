"""The digest from the store to people's inboxes: what each person gets, when a day is due, and SMTP.

- Who: the ICT manager gets everything; the Designated Safeguarding Lead gets the findings that
  involve pupils, and only those (one message when both are the same person).
- What: the digest for day D covers findings recorded from D-1 at `[digest] time` to D at that time,
  in the organisation's time zone (so a clock change moves nothing).
- Once: each (day, recipient) has a record in the store, `pending` before sending and `sent` or
  `failed` after. A sent digest is never sent again; a failed or pending one is retried (on the
  next tick or restart) with back-off. A crash between the server's acceptance and the `sent`
  record would send it again: the Message-ID is the same for every attempt, so mail systems and
  people can tell the copy.

The functions that decide take `now` as an argument; only the sinks (`SmtpSettings`, `FileSink`)
and the store do I/O.
"""

from __future__ import annotations

import email.policy
import email.utils
import hashlib
import smtplib
import ssl
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Literal, Protocol
from zoneinfo import ZoneInfo

from auditd.config import Config, People, _is_loopback, read_secret
from auditd.digest.render import AUDIENCE_ALL, AUDIENCE_PUPIL, DigestData, clean, render_html, render_text
from auditd.errors import DeliveryError
from auditd.model import Status
from auditd.policy import Policy
from auditd.store import Store

CHART_DAYS = 14
CATCH_UP_DAYS = 7  # a digest older than this is not sent late: the next one covers what is still open
MAX_RETRY = timedelta(minutes=30)


@dataclass(frozen=True)
class Recipient:
    email: str
    audience: str  # AUDIENCE_ALL or AUDIENCE_PUPIL


def recipients(people: People) -> list[Recipient]:
    """The ICT manager gets all; the DSL gets the pupil-related findings (one copy if the same person)."""
    out = [Recipient(people.ict_manager, AUDIENCE_ALL)]
    if people.dsl != people.ict_manager:
        out.append(Recipient(people.dsl, AUDIENCE_PUPIL))
    return out


# ---- which day, which window -----------------------------------------------------------------


def digest_window(day: date, at: time, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """What the digest for `day` calls new: recorded in [day-1 at `at`, day at `at`), as UTC."""
    start = datetime.combine(day - timedelta(days=1), at, tz).astimezone(UTC)
    end = datetime.combine(day, at, tz).astimezone(UTC)
    return start, end


def latest_due_day(now: datetime, at: time, tz: ZoneInfo) -> date:
    """The most recent day whose digest time has passed at `now`."""
    today = now.astimezone(tz).date()
    return today if now >= datetime.combine(today, at, tz) else today - timedelta(days=1)


def current_day(now: datetime, at: time, tz: ZoneInfo) -> date:
    """The day of the digest that will report what is recorded at `now` (the one being filled)."""
    return latest_due_day(now, at, tz) + timedelta(days=1)


def due_days(
    now: datetime,
    at: time,
    tz: ZoneInfo,
    *,
    records: Mapping[date, bool],
    last_sent: date | None,
    include_latest: bool,
    horizon: int = CATCH_UP_DAYS,
) -> list[date]:
    """The days whose digest should go out now, oldest first.

    `records` maps each recent day that has digest records to whether every recipient's was sent.
    A day is due when it has records not all sent (a failure or a crash), when it lies after the
    last day sent (the daemon was down or asleep at digest time), or when it is the latest due day
    and this is the digest tick (`include_latest`).
    """
    latest = latest_due_day(now, at, tz)
    due = []
    for back in range(horizon - 1, -1, -1):
        day = latest - timedelta(days=back)
        if day in records:
            if not records[day]:
                due.append(day)
        elif (last_sent is not None and day > last_sent) or (include_latest and day == latest):
            due.append(day)
    return due


def retry_delay(attempts: int, first: timedelta) -> timedelta:
    """Back-off after `attempts` failures: first, then doubling, at most 30 minutes."""
    delay: timedelta = first * (2 ** min(max(attempts - 1, 0), 20))
    return min(delay, max(MAX_RETRY, first))


# ---- what goes in -----------------------------------------------------------------------------


def collect(
    config: Config,
    store: Store,
    policy: Policy,
    day: date,
    now: datetime,
    *,
    audience: str = AUDIENCE_ALL,
    window: tuple[datetime, datetime] | None = None,
) -> DigestData:
    """The digest's content for one audience, read from the store."""
    tz = config.organisation.tz
    start, end = window or digest_window(day, config.digest.at, tz)
    # Asked of the store window by window: the digest of a store with a million findings reads
    # one day's findings, the first `cap` of those still open, and counts.
    pupil = audience == AUDIENCE_PUPIL
    cap = config.digest.max_items_per_section
    new = list(
        store.iter_findings(created_since=start, created_before=end, with_evidence=True, pupil_only=pupil)
    )
    still_open = list(
        store.iter_findings(
            status=Status.OPEN, created_before=start, with_evidence=True, pupil_only=pupil, limit=cap
        )
    )
    open_total = store.count_findings_where(status=Status.OPEN, created_before=start, pupil_only=pupil)
    counts = store.count_findings(pupil_only=pupil)
    usage = store.approval_usage(pupil_only=pupil)
    end_day = end.astimezone(tz).date()
    chart_from = datetime.combine(end_day - timedelta(days=CHART_DAYS), time(0), tz)
    approvals = store.list_approvals()
    if audience == AUDIENCE_PUPIL:
        approvals = [a for a in approvals if a.id in usage]
    runs = store.last_runs()
    configured = [s.name for s in (*config.mail.sources, *config.network.sources)]
    last_success = {}
    for r in runs:
        if r.status != "ok":
            ok = store.last_success(r.source)
            if ok is not None:
                last_success[r.source] = ok.finished_at or ok.started_at
    return DigestData(
        organisation=config.organisation.name,
        day=day,
        generated_at=now,
        new=new,
        still_open=still_open,
        approvals=approvals,
        health=runs,
        clauses=policy.clauses,
        rule_titles={k: v.title for k, v in policy.rules.items()},
        counts=counts,
        never_run=[n for n in configured if n not in {r.source for r in runs}],
        cap=config.digest.max_items_per_section,
        config_hint=f" --config {config.path}",
        approval_usage=usage,
        daily=daily_counts(store.created_times(since=chart_from, pupil_only=pupil), end_day=end_day, tz=tz),
        still_open_total=open_total,
        audience=audience,
        window=(start, end),
        last_success=last_success,
    )


def daily_counts(
    created: Iterable[datetime], *, end_day: date, tz: ZoneInfo, days: int = CHART_DAYS
) -> list[tuple[date, int]]:
    """New findings recorded on each of the `days` local days up to `end_day`, oldest first."""
    per_day = Counter(t.astimezone(tz).date() for t in created)
    return [(d, per_day.get(d, 0)) for d in (end_day - timedelta(days=i) for i in range(days - 1, -1, -1))]


def subject_line(data: DigestData) -> str:
    who = " (pupil-related)" if data.audience == AUDIENCE_PUPIL else ""
    return clean(
        f"{data.organisation}: audit digest{who} for {data.day:%a %d %b %Y} — "
        f"{len(data.reportable)} new, {len(data.still_open)} still open"
    )


def message_id(day: date, recipient: str, sender: str) -> str:
    """The same for every attempt at one day's digest to one person, so a copy can be recognised."""
    tag = hashlib.sha256(f"{day.isoformat()}\0{recipient}".encode()).hexdigest()[:16]
    return f"<digest-{day.isoformat()}-{tag}@{sender.rpartition('@')[2]}>"


def compose(data: DigestData, *, sender: str, recipient: str, msgid: str, now: datetime) -> EmailMessage:
    """One multipart/alternative message: plain text first, HTML second.

    Headers go through `EmailMessage` with the SMTP policy, which refuses CR or LF in a header:
    a value cannot start a new header. Only our own text is in the headers anyway.
    """
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["Subject"] = subject_line(data)
    msg["From"] = sender
    msg["To"] = recipient
    msg["Date"] = email.utils.format_datetime(now.astimezone(UTC))
    msg["Message-ID"] = msgid
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(render_text(data), charset="utf-8")
    msg.add_alternative(render_html(data), subtype="html", charset="utf-8")
    return msg


# ---- SMTP -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    starttls: bool
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    timeout: float = 30.0

    @classmethod
    def from_config(cls, config: Config) -> SmtpSettings:
        d = config.digest
        password = (
            read_secret(d.password_file, config.base, "digest.password_file") if d.password_file else None
        )
        starttls = d.starttls if d.starttls is not None else not _is_loopback(d.smtp_host)
        return cls(d.smtp_host, d.smtp_port, starttls, d.username, password, d.ca_file)

    def deliver(self, msg: EmailMessage) -> None:
        """Hand one message to the server; every failure is a DeliveryError naming the server."""
        where = f"smtp://{self.host}:{self.port}"
        if self.username and not self.starttls and not _is_loopback(self.host):
            raise DeliveryError("refusing to send the SMTP password without STARTTLS", where=where)
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                smtp.ehlo()
                if self.starttls:
                    context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
                    smtp.starttls(context=context)
                    smtp.ehlo()
                if self.username:
                    smtp.login(self.username, self.password or "")
                smtp.send_message(msg)
        except smtplib.SMTPException as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}", where=where) from exc
        except (OSError, ssl.SSLError) as exc:
            raise DeliveryError(f"cannot deliver: {exc.strerror or exc}", where=where) from exc

    send = deliver  # what callers pass as a `Send`


Send = Callable[[EmailMessage], None]  # a sink's `deliver`, as the delivery loop takes it


class Sink(Protocol):
    """Where a digest goes: the SMTP server (`SmtpSettings`) or a file (`FileSink`)."""

    def deliver(self, msg: EmailMessage) -> None:
        """Deliver one message whole, or raise DeliveryError naming where; never half-deliver silently."""
        ...


@dataclass(frozen=True)
class FileSink:
    """A file that receives a digest: its plain-text or HTML body, or the whole message as `.eml`."""

    path: Path
    form: Literal["text", "html", "eml"] = "eml"

    def deliver(self, msg: EmailMessage) -> None:
        if self.form == "eml":
            data = msg.as_bytes()
        else:
            part = msg.get_body(preferencelist=("plain",) if self.form == "text" else ("html",))
            if not isinstance(part, EmailMessage):
                raise DeliveryError(f"the message has no {self.form} part", where=str(self.path))
            data = str(part.get_content()).encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(data)
        except OSError as exc:
            raise DeliveryError(f"cannot write: {exc.strerror or exc}", where=str(self.path)) from exc


@dataclass(frozen=True)
class Outcome:
    day: date
    recipient: str
    status: str  # sent | failed | skipped (already sent)
    attempts: int
    error: str | None = None
    new: int = 0


def deliver_day(
    config: Config,
    store: Store,
    policy: Policy,
    day: date,
    now: datetime,
    send: Send,
    *,
    window: tuple[datetime, datetime] | None = None,
) -> list[Outcome]:
    """Send `day`'s digest to every recipient that has not had it; record each attempt."""
    outcomes = []
    key = day.isoformat()
    for r in recipients(config.people):
        record = store.digest_record(key, r.email)
        if record is not None and record.status == "sent":
            outcomes.append(Outcome(day, r.email, "skipped", record.attempts))
            continue
        msgid = message_id(day, r.email, config.digest.sender)
        store.mark_digest(key, r.email, status="pending", now=now, message_id=msgid)
        data = collect(config, store, policy, day, now, audience=r.audience, window=window)
        msg = compose(data, sender=config.digest.sender, recipient=r.email, msgid=msgid, now=now)
        try:
            send(msg)
        except DeliveryError as exc:
            store.mark_digest(key, r.email, status="failed", now=now, error=str(exc))
            after = store.digest_record(key, r.email)
            outcomes.append(Outcome(day, r.email, "failed", after.attempts if after else 1, str(exc)))
            continue
        store.mark_digest(key, r.email, status="sent", now=now)
        after = store.digest_record(key, r.email)
        sent = after.attempts if after else 1
        outcomes.append(Outcome(day, r.email, "sent", sent, new=len(data.reportable)))
    return outcomes


def day_records(store: Store, people: People, now: datetime, at: time, tz: ZoneInfo) -> dict[date, bool]:
    """For each recent day with digest records: whether every recipient's was sent."""
    latest = latest_due_day(now, at, tz)
    out: dict[date, bool] = {}
    for back in range(CATCH_UP_DAYS):
        day = latest - timedelta(days=back)
        found = [store.digest_record(day.isoformat(), r.email) for r in recipients(people)]
        if any(rec is not None for rec in found):
            out[day] = all(rec is not None and rec.status == "sent" for rec in found)
    return out


def deliver_due(
    config: Config, store: Store, policy: Policy, now: datetime, send: Send, *, include_latest: bool
) -> list[Outcome]:
    """Send every digest that is due now (see `due_days`), oldest first."""
    at, tz = config.digest.at, config.organisation.tz
    last = store.last_digest_day()
    days = due_days(
        now,
        at,
        tz,
        records=day_records(store, config.people, now, at, tz),
        last_sent=date.fromisoformat(last) if last else None,
        include_latest=include_latest,
    )
    outcomes: list[Outcome] = []
    for day in days:
        outcomes += deliver_day(config, store, policy, day, now, send)
    return outcomes
