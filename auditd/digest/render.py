"""The daily digest, rendered as plain text and as HTML. Pure: data in, text out.

Every value that came from mail or traffic is hostile input: the HTML form escapes all of it.
Each section is capped so the digest stays readable, with the command that lists the rest.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from html import escape

from auditd.model import Approval, RunRecord, Status, StoredFinding


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

    @property
    def suppressed(self) -> list[StoredFinding]:
        return [f for f in self.new if f.status == Status.APPROVED]

    @property
    def reportable(self) -> list[StoredFinding]:
        return [f for f in self.new if f.status != Status.APPROVED and f.status != Status.DISMISSED]

    def expiring(self, within: timedelta = timedelta(days=7)) -> list[Approval]:
        return [
            a
            for a in self.approvals
            if a.is_active(self.generated_at) and a.effective_until - self.generated_at <= within
        ]


def describe(f: StoredFinding) -> str:
    """One line that says who or where, and why."""
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
    return f"#{f.id} {head}{tag}"


def _group_key(f: StoredFinding) -> str:
    return f.subject.staff or f.subject.room or f.subject.address or "-"


def _grouped(findings: Sequence[StoredFinding]) -> dict[str, dict[str, list[StoredFinding]]]:
    out: dict[str, dict[str, list[StoredFinding]]] = defaultdict(lambda: defaultdict(list))
    for f in sorted(findings, key=lambda f: (f.rule, _group_key(f), f.first_seen)):
        out[f.rule][_group_key(f)].append(f)
    return out


def _days_running(f: StoredFinding, day: date) -> str:
    n = (day - f.created_at.date()).days + 1
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix} day running"


def _health_line(r: RunRecord) -> str:
    when = r.finished_at or r.started_at
    state = "OK" if r.status == "ok" else r.status.upper()
    line = f"{r.source} ({r.kind}): {state} at {when:%Y-%m-%d %H:%M} UTC, {r.items} items read"
    if r.skipped:
        line += f", {r.skipped} skipped"
    if r.error:
        line += f" — {r.error}"
    return line


def render_text(d: DigestData) -> str:
    out: list[str] = [
        f"{d.organisation} — choysez-auditd digest for {d.day:%A %d %B %Y}",
        "",
        f"New findings: {len(d.reportable)}   Still open from before: {len(d.still_open)}   "
        f"Suppressed by approvals: {len(d.suppressed)}",
    ]
    if d.counts:
        out.append("All findings by status: " + ", ".join(f"{k} {v}" for k, v in sorted(d.counts.items())))
    out.append("")
    out.append("NEW FINDINGS")
    if not d.reportable:
        out.append("  None. (See source health below: no findings is not the same as nothing scanned.)")
    shown = 0
    for rule, groups in _grouped(d.reportable).items():
        out.append(f"  {rule} — {d.rule_titles.get(rule, '')}")
        for c in next(iter(groups.values()))[0].clauses:
            out.append(f'    breaks {c}: "{d.clauses.get(c, "")}"')
        for who, items in groups.items():
            out.append(f"    {who}")
            for f in items:
                if shown >= d.cap:
                    break
                out.append(f"      {describe(f)}")
                for reason in f.reasons:
                    out.append(f"        - {reason}")
                shown += 1
    if len(d.reportable) > shown:
        more = len(d.reportable) - shown
        out.append(f"  … and {more} more: choysez-auditd findings --status open{d.config_hint}")
    out += ["", "STILL OPEN FROM BEFORE"]
    if not d.still_open:
        out.append("  None.")
    for f in d.still_open[: d.cap]:
        out.append(f"  {describe(f)} ({_days_running(f, d.day)})")
    if len(d.still_open) > d.cap:
        more = len(d.still_open) - d.cap
        out.append(f"  … and {more} more: choysez-auditd findings --status open{d.config_hint}")
    out += ["", "APPROVED EXCEPTIONS"]
    if d.suppressed:
        out.append("  Suppressed today:")
        for f in d.suppressed[: d.cap]:
            out.append(f"    {describe(f)} — covered by approval #{f.approval_id}")
    active = [a for a in d.approvals if a.is_active(d.generated_at)]
    if not active and not d.suppressed:
        out.append("  None active.")
    for a in active[: d.cap]:
        out.append(
            f"  approval #{a.id}: {a.rule} for {_subject(a)} until {a.effective_until:%Y-%m-%d %H:%M} UTC, "
            f"by {a.approved_by}: {a.reason}"
        )
    for a in d.expiring():
        out.append(f"  ! approval #{a.id} expires {a.effective_until:%Y-%m-%d}")
    out += ["", "SOURCE HEALTH"]
    for r in d.health:
        out.append(f"  {_health_line(r)}")
    for name in d.never_run:
        out.append(f"  {name}: NEVER RUN")
    if not d.health and not d.never_run:
        out.append("  No sources configured.")
    out += ["", f"Generated {d.generated_at:%Y-%m-%d %H:%M} UTC by choysez-auditd."]
    return "\n".join(out) + "\n"


def _subject(a: Approval) -> str:
    return ", ".join(f"{k}:{v}" for k, v in a.subject.as_dict().items())


_CSS = (
    "body{font-family:Arial,Helvetica,sans-serif;color:#222;max-width:760px}"
    "h1{font-size:20px}h2{font-size:16px;border-bottom:1px solid #ccc;margin-top:24px}"
    "table{border-collapse:collapse;width:100%}td,th{border:1px solid #ddd;padding:4px 6px;"
    "font-size:13px;text-align:left;vertical-align:top}.muted{color:#666}.bad{color:#a00}"
    ".clause{font-style:italic;color:#444;font-size:13px}"
)


def render_html(d: DigestData) -> str:
    e = escape
    parts: list[str] = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{e(d.organisation)} digest {d.day.isoformat()}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(d.organisation)} — choysez-auditd digest for {d.day:%A %d %B %Y}</h1>",
        f"<p><b>{len(d.reportable)}</b> new findings, <b>{len(d.still_open)}</b> still open from before, "
        f"<b>{len(d.suppressed)}</b> suppressed by approvals.</p>",
        "<h2>New findings</h2>",
    ]
    if not d.reportable:
        parts.append(
            "<p class='muted'>None. See source health: no findings is not the same as nothing scanned.</p>"
        )
    shown = 0
    for rule, groups in _grouped(d.reportable).items():
        first = next(iter(groups.values()))[0]
        parts.append(f"<h3>{e(rule)} — {e(d.rule_titles.get(rule, ''))}</h3>")
        for c in first.clauses:
            parts.append(f"<p class='clause'>{e(c)}: “{e(d.clauses.get(c, ''))}”</p>")
        parts.append("<table><tr><th>Who / where</th><th>Finding</th><th>Why</th></tr>")
        for who, items in groups.items():
            for f in items:
                if shown >= d.cap:
                    break
                reasons = "<br>".join(e(r) for r in f.reasons)
                parts.append(f"<tr><td>{e(who)}</td><td>{e(describe(f))}</td><td>{reasons}</td></tr>")
                shown += 1
        parts.append("</table>")
    if len(d.reportable) > shown:
        parts.append(
            f"<p>… and {len(d.reportable) - shown} more: <code>choysez-auditd findings --status open"
            f"{e(d.config_hint)}</code></p>"
        )
    parts.append("<h2>Still open from before</h2>")
    if not d.still_open:
        parts.append("<p class='muted'>None.</p>")
    else:
        parts.append("<ul>")
        for f in d.still_open[: d.cap]:
            parts.append(f"<li>{e(describe(f))} <span class='muted'>({_days_running(f, d.day)})</span></li>")
        parts.append("</ul>")
    parts.append("<h2>Approved exceptions</h2><ul>")
    for f in d.suppressed[: d.cap]:
        parts.append(f"<li>Suppressed: {e(describe(f))} — approval #{f.approval_id}</li>")
    for a in (a for a in d.approvals if a.is_active(d.generated_at)):
        parts.append(
            f"<li>Approval #{a.id}: {e(a.rule)} for {e(_subject(a))} until "
            f"{a.effective_until:%Y-%m-%d %H:%M} UTC, by {e(a.approved_by)}: {e(a.reason)}</li>"
        )
    for a in d.expiring():
        parts.append(f"<li class='bad'>Approval #{a.id} expires {a.effective_until:%Y-%m-%d}</li>")
    parts.append("</ul><h2>Source health</h2><ul>")
    for r in d.health:
        cls = "" if r.status == "ok" else " class='bad'"
        parts.append(f"<li{cls}>{e(_health_line(r))}</li>")
    for name in d.never_run:
        parts.append(f"<li class='bad'>{e(name)}: never run</li>")
    parts.append(
        f"</ul><p class='muted'>Generated {d.generated_at:%Y-%m-%d %H:%M} UTC by choysez-auditd.</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
