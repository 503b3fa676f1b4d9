"""The digest: grouped, capped, citing clauses, honest about source health, and safe with hostile input."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from auditd.digest.render import DigestData, render_html, render_text
from auditd.model import Approval, Evidence, RunRecord, Severity, Status, StoredFinding, Subject
from tests.conftest import Run

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


class TestPeopleAndReview:
    """What each approval covered, the review counts, the chart, and the DSL's copy."""

    APPROVAL = Approval(
        id=7,
        rule="MAIL-PERSONAL-SENDER",
        subject=Subject(staff="jane.smith@choysez.org.uk"),
        valid_from=NOW - timedelta(days=10),
        valid_until=NOW - timedelta(days=1),
        approved_by="centre.manager@choysez.org.uk",
        reason="Residential trip",
        granted_at=NOW - timedelta(days=11),
    )

    def test_an_ended_approval_that_suppressed_a_finding_says_what_it_covered(self) -> None:
        d = digest(
            new=[mail_finding(2, status=Status.APPROVED)], approvals=[self.APPROVAL], approval_usage={7: 3}
        )
        for text in (render_text(d), render_html(d)):
            assert "approval #7" in text and "covers 3 findings" in text and "Residential trip" in text

    def test_review_counts_are_shown(self) -> None:
        text = render_text(digest(counts={"open": 4, "confirmed": 2, "dismissed": 1}))
        assert "open 4, confirmed 2, dismissed 1, approved 0" in text

    def test_fourteen_day_chart_is_plain_html(self) -> None:
        days = [(date(2026, 11, 11) + timedelta(days=i), i % 3) for i in range(14)]
        d = digest(daily=days)
        html = render_html(d)
        assert "New findings, last 14 days" in html
        assert html.count("background-color:#c0392b") == sum(1 for _, n in days if n)
        assert "<script" not in html and "<img" not in html
        assert "NEW FINDINGS, LAST 14 DAYS" in render_text(d)

    def test_the_dsl_copy_says_what_it_holds(self) -> None:
        text = render_text(digest(audience="pupil", new=[mail_finding(1, pupil=True)]))
        assert "only findings that involve pupils" in text

    def test_still_open_and_suppressed_are_capped_too(self) -> None:
        old = [mail_finding(i, created=NOW - timedelta(days=3)) for i in range(12)]
        text = render_text(digest(still_open=old, cap=5))
        assert "… and 7 more: choysez-auditd findings --status open" in text


class TestControlCharacters:
    """A subject line cannot start a line of its own in the text digest, nor reorder it."""

    def test_newlines_and_bidi_overrides_are_neutralised(self) -> None:
        evil = "Homework\r\nNEW FINDINGS: None\u202e gnp.exe"
        text = render_text(digest(new=[mail_finding(1, subject=evil)]))
        assert not any(line.startswith("NEW FINDINGS: None") for line in text.splitlines())
        assert "\u202e" not in text and "\r" not in text


class TestSubjectExport:
    """`findings --subject staff:EMAIL --format json` gives a person's findings, evidence and approvals."""

    def test_export_has_evidence_and_the_approval(self, cli: Run, school: Path) -> None:
        config = school / "config.toml"
        cli("demo", "--config", config, check=True)
        out = cli(
            "findings",
            "--config",
            config,
            "--subject",
            "staff:tom.baker@choysez.org.uk",
            "--format",
            "json",
            check=True,
        ).stdout
        found = json.loads(out)
        assert found and all(f["subject"]["staff"] == "tom.baker@choysez.org.uk" for f in found)
        assert all(f["evidence"] and "message_id" in f["evidence"][0] for f in found)
        approved = [f for f in found if f["approval"] is not None]
        assert len(approved) == 1
        assert approved[0]["approval"]["approved_by"] == "centre.manager@choysez.org.uk"
        assert "Lake District" in approved[0]["approval"]["reason"]
