"""The daily digest, rendered as plain text and as HTML. Pure: data in, text out.

Every value that came from mail or traffic is hostile input: the HTML form escapes all of it,
and both forms drop control characters (a subject line could carry CR/LF or terminal escapes).
Each section is capped so the digest stays readable, with the command that lists the rest. The
HTML is what mail clients render: tables, inline styles and background colours; no script, no
images, no external resources.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from html import escape

from auditd.model import Approval, RunRecord, Status, StoredFinding

AUDIENCE_ALL = "all"
AUDIENCE_PUPIL = "pupil"

# C0 and C1 controls, and the bidirectional overrides that make text read differently from what it is.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean(text: object) -> str:
    """A value from mail or traffic as one safe line of text (controls become spaces)."""
    return _CONTROL.sub(" ", str(text))


@dataclass(frozen=True)
class DigestData:
    organisation: str
    day: date
    generated_at: datetime
    new: Sequence[StoredFinding]
    still_open: Sequence[StoredFinding]
    approvals: Sequence[Approval]
    health: Sequence[RunRecord]
    clauses: dict[str, str]
    rule_titles: dict[str, str]
    counts: dict[str, int] = field(default_factory=dict)
    never_run: Sequence[str] = ()
    cap: int = 25
    config_hint: str = ""
    approval_usage: dict[int, int] = field(default_factory=dict)
    daily: Sequence[tuple[date, int]] = ()  # new findings per day, oldest first (the chart)
    still_open_total: int | None = None  # when `still_open` holds only the first `cap` of them
    audience: str = AUDIENCE_ALL
    window: tuple[datetime, datetime] | None = None  # what "new" means: created in [start, end)
    last_success: dict[str, datetime] = field(default_factory=dict)  # per source, for failing ones

    @property
    def suppressed(self) -> list[StoredFinding]:
        return [f for f in self.new if f.status == Status.APPROVED]

    @property
    def open_before(self) -> int:
        """How many findings are still open from before (all of them, not only those listed)."""
        return self.still_open_total if self.still_open_total is not None else len(self.still_open)

    @property
    def reportable(self) -> list[StoredFinding]:
        return [f for f in self.new if f.status != Status.APPROVED and f.status != Status.DISMISSED]

    @property
    def active_approvals(self) -> list[Approval]:
        """Approvals in force now, and any (even ended) that suppressed a finding in this digest."""
        used = {f.approval_id for f in self.suppressed}
        return [a for a in self.approvals if a.is_active(self.generated_at) or a.id in used]

    def expiring(self, within: timedelta = timedelta(days=7)) -> list[Approval]:
        return [
            a
            for a in self.approvals
            if a.is_active(self.generated_at) and a.effective_until - self.generated_at <= within
        ]

    def list_command(self, status: str) -> str:
        pupil = " (those marked pupil involved are yours)" if self.audience == AUDIENCE_PUPIL else ""
        return f"choysez-auditd findings --status {status}{self.config_hint}{pupil}"


def describe(f: StoredFinding) -> str:
    """One line that says who or where, and why; safe to print (controls removed)."""
    s = f.subject
    ev = f.evidence[0].data if f.evidence else {}
    if f.rule.startswith("MAIL-"):
        head = f"{s.staff} using {s.address}"
        subject = ev.get("subject")
        if subject:
            head += f' — "{subject}"'
    else:
        when = f"{ev.get('period', '?')} on {ev.get('lesson_date', '?')}"
        head = f"{s.room}, device {s.device}: {s.service} in {when}"
        if s.staff:
            head += f" (device of {s.staff})"
    tag = " [pupil involved]" if f.pupil_involved else ""
    return clean(f"#{f.id} {head}{tag}")


def _group_key(f: StoredFinding) -> str:
    return clean(f.subject.staff or f.subject.room or f.subject.address or "-")


def _grouped(findings: Sequence[StoredFinding]) -> dict[str, dict[str, list[StoredFinding]]]:
    out: dict[str, dict[str, list[StoredFinding]]] = defaultdict(lambda: defaultdict(list))
    for f in sorted(findings, key=lambda f: (f.rule, _group_key(f), f.first_seen)):
        out[f.rule][_group_key(f)].append(f)
    return out


def ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _days_running(f: StoredFinding, day: date) -> str:
    return f"{ordinal((day - f.created_at.date()).days + 1)} day running"


def _health_line(r: RunRecord, last_success: dict[str, datetime]) -> str:
    when = r.finished_at or r.started_at
    state = "OK" if r.status == "ok" else r.status.upper()
    line = f"{r.source} ({r.kind}): {state} at {when:%Y-%m-%d %H:%M} UTC, {r.items} items read"
    if r.skipped:
        line += f", {r.skipped} skipped"
    if r.error:
        line += f" — {r.error}"
    if r.status != "ok":
        ok = last_success.get(r.source)
        line += f" (last success {ok:%Y-%m-%d %H:%M} UTC)" if ok else " (no successful run on record)"
    return clean(line)


def _subject(a: Approval) -> str:
    return clean(", ".join(f"{k}:{v}" for k, v in a.subject.as_dict().items()))


def _status_counts(d: DigestData) -> str:
    order = ("open", "confirmed", "dismissed", "approved")
    return ", ".join(f"{k} {d.counts.get(k, 0)}" for k in order)


def _approval_line(d: DigestData, a: Approval) -> str:
    used = d.approval_usage.get(a.id, 0)
    return clean(
        f"approval #{a.id}: {a.rule} for {_subject(a)} until {a.effective_until:%Y-%m-%d %H:%M} UTC, "
        f"by {a.approved_by}: {a.reason} — covers {used} finding{'s' if used != 1 else ''}"
    )


def _more(n: int, command: str) -> str:
    return f"… and {n} more: {command}"


def _bar(n: int, top: int, width: int = 30) -> str:
    return "#" * (0 if top == 0 else max(1 if n else 0, round(width * n / top)))


# ---- text -------------------------------------------------------------------------------------


def render_text(d: DigestData) -> str:
    out: list[str] = [
        f"{d.organisation} — choysez-auditd digest for {d.day:%A %d %B %Y}",
    ]
    if d.audience == AUDIENCE_PUPIL:
        out.append("For the Designated Safeguarding Lead: only findings that involve pupils.")
    if d.window is not None:
        start, end = d.window
        out.append(f"New means recorded from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC.")
    out += [
        "",
        f"New findings: {len(d.reportable)}   Still open from before: {d.open_before}   "
        f"Suppressed by approvals: {len(d.suppressed)}",
    ]
    if d.counts:
        out.append(f"All findings by review status: {_status_counts(d)}")
    out += ["", "NEW FINDINGS"]
    if not d.reportable:
        out.append("  None. (See source health below: no findings is not the same as nothing scanned.)")
    shown = 0
    for rule, groups in _grouped(d.reportable).items():
        if shown >= d.cap:
            break
        out.append(f"  {rule} — {d.rule_titles.get(rule, '')}")
        for c in next(iter(groups.values()))[0].clauses:
            out.append(f'    breaks {c}: "{d.clauses.get(c, "")}"')
        for who, items in groups.items():
            if shown >= d.cap:
                break
            out.append(f"    {who}")
            for f in items:
                if shown >= d.cap:
                    break
                out.append(f"      {describe(f)}")
                for reason in f.reasons:
                    out.append(f"        - {clean(reason)}")
                shown += 1
    if len(d.reportable) > shown:
        out.append("  " + _more(len(d.reportable) - shown, d.list_command("open")))
    out += ["", "STILL OPEN FROM BEFORE"]
    if not d.still_open:
        out.append("  None.")
    for f in d.still_open[: d.cap]:
        out.append(f"  {describe(f)} ({_days_running(f, d.day)})")
    if d.open_before > d.cap:
        out.append("  " + _more(d.open_before - d.cap, d.list_command("open")))
    out += ["", "APPROVED EXCEPTIONS"]
    if d.suppressed:
        out.append("  Suppressed:")
        for f in d.suppressed[: d.cap]:
            out.append(f"    {describe(f)} — covered by approval #{f.approval_id}")
        if len(d.suppressed) > d.cap:
            out.append("    " + _more(len(d.suppressed) - d.cap, d.list_command("approved")))
    active = d.active_approvals
    if not active and not d.suppressed:
        out.append("  None active.")
    for a in active[: d.cap]:
        out.append(f"  {_approval_line(d, a)}")
    if len(active) > d.cap:
        cmd = f"choysez-auditd approvals list --active{d.config_hint}"
        out.append("  " + _more(len(active) - d.cap, cmd))
    for a in d.expiring():
        out.append(f"  ! approval #{a.id} expires {a.effective_until:%Y-%m-%d}")
    out += ["", "SOURCE HEALTH"]
    for r in d.health:
        out.append(f"  {_health_line(r, d.last_success)}")
    for name in d.never_run:
        out.append(f"  {clean(name)}: NEVER RUN")
    if not d.health and not d.never_run:
        out.append("  No sources configured.")
    if d.daily:
        top = max(n for _, n in d.daily)
        out += ["", f"NEW FINDINGS, LAST {len(d.daily)} DAYS"]
        for day, n in d.daily:
            out.append(f"  {day:%a %d %b}  {n:>4}  {_bar(n, top)}")
    out += ["", f"Generated {d.generated_at:%Y-%m-%d %H:%M} UTC by choysez-auditd."]
    return "\n".join(out) + "\n"


# ---- HTML -------------------------------------------------------------------------------------

_CSS = (
    "body{font-family:Arial,Helvetica,sans-serif;color:#222;max-width:760px}"
    "h1{font-size:20px}h2{font-size:16px;border-bottom:1px solid #ccc;margin-top:24px}"
    "table{border-collapse:collapse;width:100%}td,th{border:1px solid #ddd;padding:4px 6px;"
    "font-size:13px;text-align:left;vertical-align:top}.muted{color:#666}.bad{color:#a00}"
    ".clause{font-style:italic;color:#444;font-size:13px}"
)


def _html_chart(d: DigestData) -> list[str]:
    """A bar chart as a table: a coloured cell whose width is the count (mail clients render it)."""
    top = max((n for _, n in d.daily), default=0)
    rows = [
        f"<h2>New findings, last {len(d.daily)} days</h2>",
        "<table role='presentation' style='border-collapse:collapse;width:100%'>",
    ]
    for day, n in d.daily:
        pct = 0 if top == 0 else max(1 if n else 0, round(100 * n / top))
        bar = (
            f"<table role='presentation' style='border-collapse:collapse' width='{pct}%'><tr>"
            f"<td style='background-color:#c0392b;height:12px;padding:0;border:0'"
            f" bgcolor='#c0392b'>&nbsp;</td></tr></table>"
            if pct
            else "&nbsp;"
        )
        rows.append(
            f"<tr><td style='width:90px;white-space:nowrap;border:0'>{day:%a %d %b}</td>"
            f"<td style='width:40px;text-align:right;border:0'>{n}</td>"
            f"<td style='border:0'>{bar}</td></tr>"
        )
    rows.append("</table>")
    return rows


def render_html(d: DigestData) -> str:
    e = escape
    parts: list[str] = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{e(d.organisation)} digest {d.day.isoformat()}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(d.organisation)} — choysez-auditd digest for {d.day:%A %d %B %Y}</h1>",
    ]
    if d.audience == AUDIENCE_PUPIL:
        parts.append("<p>For the Designated Safeguarding Lead: only findings that involve pupils.</p>")
    parts.append(
        f"<p><b>{len(d.reportable)}</b> new findings, <b>{d.open_before}</b> still open from before, "
        f"<b>{len(d.suppressed)}</b> suppressed by approvals.</p>"
    )
    if d.counts:
        parts.append(f"<p class='muted'>All findings by review status: {e(_status_counts(d))}</p>")
    parts.append("<h2>New findings</h2>")
    if not d.reportable:
        parts.append(
            "<p class='muted'>None. See source health: no findings is not the same as nothing scanned.</p>"
        )
    shown = 0
    for rule, groups in _grouped(d.reportable).items():
        if shown >= d.cap:
            break
        first = next(iter(groups.values()))[0]
        parts.append(f"<h3>{e(rule)} — {e(d.rule_titles.get(rule, ''))}</h3>")
        for c in first.clauses:
            parts.append(f"<p class='clause'>{e(c)}: “{e(d.clauses.get(c, ''))}”</p>")
        parts.append("<table><tr><th>Who / where</th><th>Finding</th><th>Why</th></tr>")
        for who, items in groups.items():
            for f in items:
                if shown >= d.cap:
                    break
                reasons = "<br>".join(e(clean(r)) for r in f.reasons)
                parts.append(f"<tr><td>{e(who)}</td><td>{e(describe(f))}</td><td>{reasons}</td></tr>")
                shown += 1
        parts.append("</table>")
    if len(d.reportable) > shown:
        parts.append(f"<p>{e(_more(len(d.reportable) - shown, d.list_command('open')))}</p>")
    parts.append("<h2>Still open from before</h2>")
    if not d.still_open:
        parts.append("<p class='muted'>None.</p>")
    else:
        parts.append("<ul>")
        for f in d.still_open[: d.cap]:
            parts.append(f"<li>{e(describe(f))} <span class='muted'>({_days_running(f, d.day)})</span></li>")
        parts.append("</ul>")
        if d.open_before > d.cap:
            parts.append(f"<p>{e(_more(d.open_before - d.cap, d.list_command('open')))}</p>")
    parts.append("<h2>Approved exceptions</h2><ul>")
    for f in d.suppressed[: d.cap]:
        parts.append(f"<li>Suppressed: {e(describe(f))} — approval #{f.approval_id}</li>")
    if len(d.suppressed) > d.cap:
        parts.append(f"<li>{e(_more(len(d.suppressed) - d.cap, d.list_command('approved')))}</li>")
    active = d.active_approvals
    if not active and not d.suppressed:
        parts.append("<li class='muted'>None active.</li>")
    for a in active[: d.cap]:
        parts.append(f"<li>{e(_approval_line(d, a))}</li>")
    if len(active) > d.cap:
        cmd = f"choysez-auditd approvals list --active{d.config_hint}"
        parts.append(f"<li>{e(_more(len(active) - d.cap, cmd))}</li>")
    for a in d.expiring():
        parts.append(f"<li class='bad'>Approval #{a.id} expires {a.effective_until:%Y-%m-%d}</li>")
    parts.append("</ul><h2>Source health</h2><ul>")
    for r in d.health:
        cls = "" if r.status == "ok" else " class='bad'"
        parts.append(f"<li{cls}>{e(_health_line(r, d.last_success))}</li>")
    for name in d.never_run:
        parts.append(f"<li class='bad'>{e(name)}: never run</li>")
    if not d.health and not d.never_run:
        parts.append("<li>No sources configured.</li>")
    parts.append("</ul>")
    if d.daily:
        parts += _html_chart(d)
    parts.append(f"<p class='muted'>Generated {d.generated_at:%Y-%m-%d %H:%M} UTC by choysez-auditd.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
