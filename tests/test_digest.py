"""The digest: grouped, capped, citing clauses, honest about source health, and safe with hostile input."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from auditd.digest.render import DigestData, render_html, render_text
from auditd.model import Approval, Evidence, RunRecord, Severity, Status, StoredFinding, Subject

NOW = datetime(2026, 11, 24, 7, 0, tzinfo=UTC)
CLAUSES = {
    "SMP-1.5": "All email communications ... official Choysez email account.",
    "SMP-1.10": "No Netflix.",
}
HOSTILE = '<script>alert("x")</script> & <b>Term report</b>'


def mail_finding(
    i: int,
    *,
    subject: str = "Lily's homework",
    status: Status = Status.OPEN,
    created: datetime = NOW,
    pupil: bool = False,
) -> StoredFinding:
    return StoredFinding(
        id=i,
        rule="MAIL-PERSONAL-SENDER",
        clauses=("SMP-1.5",),
        severity=Severity.MEDIUM,
        status=status,
        subject=Subject(staff="jane.smith@choysez.org.uk", address="jane77@gmail.com"),
        fingerprint=f"fp{i}",
        first_seen=created,
        last_seen=created,
        occurrences=1,
        pupil_involved=pupil,
        approval_id=7 if status == Status.APPROVED else None,
        reasons=("mentions pupil",),
        created_at=created,
        evidence=(Evidence(f"m{i}", created, {"subject": subject}),),
    )


def digest(**kw: object) -> DigestData:
    base: dict[str, object] = {
        "organisation": "Choysez",
        "day": date(2026, 11, 24),
        "generated_at": NOW,
        "new": [],
        "still_open": [],
        "approvals": [],
        "health": [],
        "clauses": CLAUSES,
        "rule_titles": {"MAIL-PERSONAL-SENDER": "personal sender"},
    }
    base.update(kw)
    return DigestData(**base)  # type: ignore[arg-type]


class TestContent:
    """What the ICT manager reads."""

    def test_new_findings_cite_their_clause(self) -> None:
        text = render_text(digest(new=[mail_finding(1)]))
        assert "MAIL-PERSONAL-SENDER" in text
        assert CLAUSES["SMP-1.5"] in text
        assert "jane.smith@choysez.org.uk" in text

    def test_no_findings_is_told_apart_from_nothing_scanned(self) -> None:
        run = RunRecord(1, "staff-imap", "mail", NOW, NOW, "failed", error="connection refused")
        text = render_text(digest(health=[run], never_run=["captures"]))
        assert "None." in text
        assert "staff-imap (mail): FAILED" in text and "connection refused" in text
        assert "captures: NEVER RUN" in text

    def test_sections_are_capped_with_the_command_for_the_rest(self) -> None:
        text = render_text(digest(new=[mail_finding(i) for i in range(40)], cap=10))
        assert "… and 30 more: choysez-auditd findings --status open" in text

    def test_still_open_counts_days(self) -> None:
        old = mail_finding(1, created=NOW - timedelta(days=2))
        assert "3rd day running" in render_text(digest(still_open=[old]))

    def test_suppressed_and_expiring_approvals_are_shown(self) -> None:
        approval = Approval(
            id=7,
            rule="MAIL-PERSONAL-SENDER",
            subject=Subject(staff="jane.smith@choysez.org.uk"),
            valid_from=NOW - timedelta(days=1),
            valid_until=NOW + timedelta(days=3),
            approved_by="centre.manager@choysez.org.uk",
            reason="Residential trip",
            granted_at=NOW - timedelta(days=9),
        )
        text = render_text(digest(new=[mail_finding(2, status=Status.APPROVED)], approvals=[approval]))
        assert "covered by approval #7" in text
        assert "approval #7 expires 2026-11-27" in text
        assert "Residential trip" in text


class TestHostileInput:
    """A subject line is hostile input: it is shown as text, never as markup."""

    def test_html_escapes_values_from_mail(self) -> None:
        html = render_html(digest(new=[mail_finding(1, subject=HOSTILE)]))
        assert "<script>" not in html
        assert "&lt;script&gt;" in html
        assert "<b>Term report</b>" not in html
