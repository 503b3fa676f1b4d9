"""The mail rules on realistic Outlook, Gmail and Apple Mail messages (tests/data/mail, see its README).

Each message file has its expected findings below, in the fail2ban way: the suite walks every file,
so a new sample without an expectation fails.
"""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import UTC, datetime

import pytest

from auditd.directory import CommunityMember, People, StaffMember, load_community, load_staff
from auditd.model import Address, Finding, ForwardingRule, MailMessage
from auditd.policy import Policy, load_policy
from auditd.rules.mail import (
    FORWARD,
    RECIPIENT,
    SENDER,
    MailRules,
    automatic_kind,
    forward_signals,
    forwarding_findings,
    own_text,
    quoted_headers,
)
from auditd.sources.mailfile import parse_message, read_eml, read_maildir
from tests.conftest import ROOT, SAMPLE

DATA = ROOT / "tests" / "data" / "mail"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def official(email: str) -> bool:
    return email.endswith("@choysez.org.uk")


@pytest.fixture(scope="module")
def policy() -> Policy:
    if not (ROOT / "policies" / "personal-mail-providers.toml").is_file():
        pytest.skip("policies/personal-mail-providers.toml not present yet")
    return load_policy()


@pytest.fixture(scope="module")
def people() -> People:
    return People.build(load_staff(DATA / "staff.csv", official), load_community(DATA / "community.csv"))


@pytest.fixture(scope="module")
def rules(people: People, policy: Policy) -> MailRules:
    return MailRules(people, policy, official)


def with_mail(policy: Policy, **changes: object) -> Policy:
    return dataclasses.replace(policy, mail=policy.mail.model_copy(update=changes))


def msg(
    sender: str,
    to: list[str],
    text: str,
    *,
    subject: str = "",
    name: str = "",
    to_names: dict[str, str] | None = None,
    reply_to: tuple[str, ...] = (),
    headers: tuple[tuple[str, str], ...] = (),
) -> MailMessage:
    names = to_names or {}
    return MailMessage(
        source="test",
        location="test",
        message_id=f"<{abs(hash((sender, tuple(to), text, subject)))}@test>",
        date=datetime(2026, 11, 24, 10, 0, tzinfo=UTC),
        sender=Address(sender, name),
        to=tuple(Address(t, names.get(t, "")) for t in to),
        subject=subject,
        text=text,
        reply_to=tuple(Address(a) for a in reply_to),
        headers=headers,
    )


def summary(findings: list[Finding]) -> set[tuple[str, str | None, str | None, object]]:
    return {
        (f.rule, f.subject.staff, f.subject.address, f.evidence[0].data.get("confidence")) for f in findings
    }


JANE, TOM, SAM, PRIYA = (
    "jane.smith@choysez.org.uk",
    "tom.baker@choysez.org.uk",
    "sam.okafor@choysez.org.uk",
    "priya.patel@choysez.org.uk",
)
EXPECTED: dict[str, set[tuple[str, str | None, str | None, object]]] = {
    # Outlook
    "outlook-personal-sender-declared.eml": {(SENDER, TOM, "tom.baker@btinternet.com", "declared")},
    "outlook-forward-to-undeclared.eml": {(RECIPIENT, PRIYA, "priya.patel.home@outlook.com", "high")},
    "outlook-inbox-rule-forward.eml": {(FORWARD, JANE, "jsmith.teach@gmail.com", None)},
    "outlook-forward-as-attachment.eml": {(RECIPIENT, TOM, "tom.baker@btinternet.com", "declared")},
    "outlook-auto-reply.eml": set(),
    "outlook-bounce.eml": set(),
    "outlook-parent-to-official.eml": set(),
    # Gmail
    "gmail-undeclared-sender-high.eml": {(SENDER, SAM, "samokafor88@gmail.com", "high")},
    "gmail-undeclared-shared-name.eml": {(SENDER, JANE, "jane.smith.teach@gmail.com", "medium")},
    "gmail-parent-named-like-staff.eml": set(),
    "gmail-auto-forwarded-1.eml": {(FORWARD, JANE, "jane.smith.teach@gmail.com", None)},
    "gmail-auto-forwarded-2.eml": {(FORWARD, JANE, "jane.smith.teach@gmail.com", None)},
    "gmail-newsletter.eml": set(),
    # Apple Mail
    "apple-colleague-personal.eml": set(),
    "apple-self-no-business.eml": set(),
    "apple-forward-to-personal.eml": {(RECIPIENT, TOM, "tom.baker@btinternet.com", "declared")},
    "apple-redirect-resent.eml": {(FORWARD, TOM, "tom.baker@btinternet.com", None)},
}


def evaluate_file(rules: MailRules, name: str) -> tuple[MailMessage, list[Finding]]:
    m = read_eml(DATA / name, source="test")
    assert m is not None
    return m, rules.evaluate(m, now=NOW)


class TestSampleMessages:
    """Every sample message gives exactly the findings written beside its name."""

    def test_every_sample_has_an_expectation(self) -> None:
        assert {p.name for p in DATA.glob("*.eml")} == set(EXPECTED)

    @pytest.mark.parametrize("name", sorted(EXPECTED))
    def test_findings(self, rules: MailRules, name: str) -> None:
        _, found = evaluate_file(rules, name)
        assert summary(found) == EXPECTED[name]

    def test_reasons_say_what_tied_an_undeclared_sender(self, rules: MailRules) -> None:
        _, (f,) = evaluate_file(rules, "gmail-undeclared-sender-high.eml")
        assert "display name matches staff Sam Okafor" in f.reasons
        assert "signed 'Sam Okafor, Teaching Assistant, Choysez'" in f.reasons
        assert f"quoted reply header shows Sam Okafor <{SAM}>" in f.reasons
        assert "business terms: homework, lesson" in f.reasons
        assert f.pupil_involved and f.evidence[0].data["pupils"] == ["Oliver Brown"]

    def test_shared_name_counts_only_the_signed_role(self, rules: MailRules) -> None:
        _, (f,) = evaluate_file(rules, "gmail-undeclared-shared-name.eml")
        assert not any(r.startswith("display name") for r in f.reasons)
        assert any("shared with a community member (parent)" in r for r in f.reasons)

    def test_forwarded_attachment_content_is_scored(self, rules: MailRules) -> None:
        _, (f,) = evaluate_file(rules, "outlook-forward-as-attachment.eml")
        assert f.evidence[0].data["pupils"] == ["Oliver Brown"]
        assert "ehcp" in f.evidence[0].data["terms"]  # type: ignore[operator]

    def test_one_forwarding_arrangement_is_one_fingerprint(self, rules: MailRules) -> None:
        _, (a,) = evaluate_file(rules, "gmail-auto-forwarded-1.eml")
        _, (b,) = evaluate_file(rules, "gmail-auto-forwarded-2.eml")
        assert a.fingerprint == b.fingerprint
        assert a.evidence[0].key != b.evidence[0].key
        assert a.severity.value == "high"
        assert "envelope sender with +caf_= (Gmail forwarding)" in a.reasons

    def test_sample_school_still_gives_what_the_demo_shows(self, policy: Policy) -> None:
        people = People.build(
            load_staff(SAMPLE / "staff.csv", official), load_community(SAMPLE / "community.csv")
        )
        r = MailRules(people, policy, official)
        found = [f for m, _ in read_maildir(SAMPLE / "mail", source="s") for f in r.evaluate(m, now=NOW)]
        pairs = {(f.rule, f.subject.address) for f in found}
        assert pairs == {
            (SENDER, "jane.smith77@gmail.com"),
            (SENDER, "tom.baker@btinternet.com"),
            (RECIPIENT, "tbaker.home@outlook.com"),
            (RECIPIENT, "sam.okafor@icloud.com"),
        }
        assert len([f for f in found if f.subject.address == "jane.smith77@gmail.com"]) == 2


class TestWhoIsStaff:
    """Declared addresses, evidence for undeclared ones, and people who share a name."""

    BUSINESS = "Lily Evans needs her consent form for the trip and her homework by Friday."

    def test_known_community_address_is_never_staff(self, rules: MailRules) -> None:
        m = msg(
            "jane.smith.home@hotmail.co.uk",
            [JANE],
            self.BUSINESS + "\n\nJane Smith\nYear 6 Teacher, Choysez\n",
            name="Jane Smith",
            reply_to=(JANE,),
        )
        assert rules.evaluate(m, now=NOW) == []

    def test_display_name_alone_is_medium_and_thresholded(self, rules: MailRules, policy: Policy) -> None:
        m = msg("p.patel1980@yahoo.co.uk", ["mark.evans@example.net"], self.BUSINESS, name="Patel, Priya")
        (f,) = rules.evaluate(m, now=NOW)
        assert (f.rule, f.subject.staff, f.evidence[0].data["confidence"]) == (SENDER, PRIYA, "medium")
        strict = MailRules(rules.people, with_mail(policy, undeclared_min_confidence="high"), official)
        assert strict.evaluate(m, now=NOW) == []

    def test_shared_name_with_only_display_name_and_plain_signoff_is_not_reported(
        self, rules: MailRules
    ) -> None:
        text = (
            self.BUSINESS + "\n\nThanks,\nJane Smith\n\n"
            "On Mon, 23 Nov 2026, Jane Smith <jane.smith@choysez.org.uk> wrote:\n> hello\n"
        )
        m = msg("jane.s.1975@gmail.com", ["mark.evans@example.net"], text, name="Jane Smith")
        assert rules.evaluate(m, now=NOW) == []

    def test_reply_to_official_address_ties_strongly(self, rules: MailRules) -> None:
        m = msg(
            "jane.s.1975@gmail.com",
            ["mark.evans@example.net"],
            self.BUSINESS,
            name="Jane Smith",
            reply_to=(JANE,),
        )
        (f,) = rules.evaluate(m, now=NOW)
        assert f.subject.staff == JANE
        assert f.evidence[0].data["confidence"] == "medium"  # strong, but the name is shared
        assert f"Reply-To is Jane Smith's official address {JANE}" in f.reasons

    def test_two_staff_with_one_name_need_evidence_that_tells_them_apart(self, policy: Policy) -> None:
        staff = [
            StaffMember("Chris Doyle", "ict.manager@choysez.org.uk", "ICT Manager", ()),
            StaffMember("Chris Doyle", "c.doyle@choysez.org.uk", "Youth Worker", ()),
        ]
        community = [CommunityMember("Lily Evans", None, "pupil", None)]
        r = MailRules(People.build(staff, community), policy, official)
        m = msg("chrisd@gmail.com", ["x.parent@example.net"], self.BUSINESS, name="Chris Doyle")
        assert r.evaluate(m, now=NOW) == []
        signed = msg(
            "chrisd@gmail.com",
            ["x.parent@example.net"],
            self.BUSINESS + "\n\nChris Doyle\nICT Manager\n",
            name="Chris Doyle",
        )
        (f,) = r.evaluate(signed, now=NOW)
        assert f.subject.staff == "ict.manager@choysez.org.uk"

    def test_signoff_in_quoted_text_does_not_count(self, rules: MailRules) -> None:
        text = (
            self.BUSINESS
            + "\n\nRegards\n\nOn Mon, 23 Nov 2026 at 10:00, Sam Okafor <sam.okafor@choysez.org.uk> wrote:\n"
            "> Sam Okafor\n> Teaching Assistant, Choysez\n"
        )
        m = msg("anon.parent@gmail.com", ["mark.evans@example.net"], text)
        assert rules.evaluate(m, now=NOW) == []

    def test_undeclared_at_non_personal_domain_is_not_guessed(self, rules: MailRules) -> None:
        m = msg("jane@smith-family.example", ["mark.evans@example.net"], self.BUSINESS, name="Sam Okafor")
        assert rules.evaluate(m, now=NOW) == []

    def test_identification_can_be_switched_off(self, rules: MailRules, policy: Policy) -> None:
        off = MailRules(rules.people, with_mail(policy, identify_undeclared=False), official)
        _, found = evaluate_file(off, "gmail-undeclared-sender-high.eml")
        assert found == []


class TestBusiness:
    """The business score: transparent reasons, colleagues' personal matters, automatic mail."""

    def test_colleague_personal_matter_is_not_business(self, rules: MailRules) -> None:
        m = msg("tom.baker@btinternet.com", [SAM], "End of term drinks? My son's swimming class ends at 6.")
        assert rules.evaluate(m, now=NOW) == []
        same_words_to_parent = msg(
            "tom.baker@btinternet.com", ["mark.evans@example.net"], "End of term drinks? The class ends at 6."
        )
        assert [f.rule for f in rules.evaluate(same_words_to_parent, now=NOW)] == [SENDER]

    def test_own_official_address_with_business_is_a_finding(self, rules: MailRules) -> None:
        m = msg(
            "tom.baker@btinternet.com",
            [TOM],
            "Notes for Oliver Brown's progress report before parents' evening.",
        )
        (f,) = rules.evaluate(m, now=NOW)
        assert f.evidence[0].data["threshold"] == 4
        assert "only staff among the correspondents: business needs a score of 4" in f.reasons

    def test_places_are_configurable(self, rules: MailRules, policy: Policy) -> None:
        text = "See you at Oakfield House on Tuesday."
        m = msg("tom.baker@btinternet.com", ["mark.evans@example.net"], text)
        base = rules.business.score(m, [])
        placed = MailRules(rules.people, with_mail(policy, places=["Oakfield House"]), official)
        scored = placed.business.score(m, [])
        assert scored.points == base.points + 1
        assert "mentions place: Oakfield House" in scored.reasons

    def test_addresses_are_not_mentions_of_choysez(self, rules: MailRules) -> None:
        m = msg("tom.baker@btinternet.com", [SAM], "write to me at tom.baker@choysez.org.uk")
        assert rules.business.score(m, []).points == 0

    @pytest.mark.parametrize(
        ("headers", "subject", "sender", "expected"),
        [
            (
                (("Auto-Submitted", "auto-replied"),),
                "Re: trip",
                "jane.smith@choysez.org.uk",
                "Auto-Submitted",
            ),
            ((("Precedence", "bulk"),), "News", "office@choysez.org.uk", "Precedence"),
            ((("List-Id", "<families.choysez.org.uk>"),), "News", "office@choysez.org.uk", "List-*"),
            ((("Feedback-ID", "1:2:3"),), "Offers", "shop@example.com", "bulk-sender"),
            ((("Content-Type", "multipart/report; report-type=delivery-status"),), "x", "a@b.c", "report"),
            ((("Return-Path", "<>"),), "x", "a@b.c", "bounce"),
            ((), "Out of Office: back Monday", "jane.smith@choysez.org.uk", "subject"),
            ((), "Automatic reply: homework", "jane.smith@choysez.org.uk", "subject"),
            ((), "Delivery Status Notification (Failure)", "x@gmail.com", "subject"),
            ((), "hello", "MAILER-DAEMON@example.com".lower(), "mailer-daemon"),
            ((), "hello", "no-reply@school.example", "no-reply"),
        ],
    )
    def test_automatic_mail_is_not_contact(
        self,
        rules: MailRules,
        headers: tuple[tuple[str, str], ...],
        subject: str,
        sender: str,
        expected: str,
    ) -> None:
        m = msg(
            sender, ["jane.smith77@gmail.com"], "Lily Evans homework trip", subject=subject, headers=headers
        )
        kind = automatic_kind(m, rules.policy.mail)
        assert kind is not None and expected in kind
        assert [f for f in rules.evaluate(m, now=NOW) if f.rule != FORWARD] == []

    def test_an_ordinary_message_is_not_automatic(self, rules: MailRules) -> None:
        m = msg("mark.evans@example.net", [JANE], "hi", subject="Re: Automatic doors at the centre")
        assert automatic_kind(m, rules.policy.mail) is None


class TestAutoForward:
    """Auto-forwarding from headers and from inbox rules: one finding per arrangement."""

    def test_srs_envelope_sender_from_an_official_forwarder(self, rules: MailRules) -> None:
        m = msg(
            "mark.evans@example.net",
            [JANE],
            "hello",
            headers=(
                ("Return-Path", "<SRS0=AbCd=T2=example.net=mark.evans@choysez.org.uk>"),
                ("Delivered-To", "jane.smith.teach@gmail.com"),
            ),
        )
        (s,) = forward_signals(m, official)
        assert (s.mailbox, s.target) == (JANE, "jane.smith.teach@gmail.com")

    def test_srs_from_someone_elses_forwarder_is_not_ours(self, rules: MailRules) -> None:
        m = msg(
            "mark.evans@example.net",
            [JANE],
            "hello",
            headers=(
                ("Return-Path", "<SRS0=AbCd=T2=example.net=mark.evans@forwarder.example>"),
                ("Delivered-To", "jane.smith.teach@gmail.com"),
            ),
        )
        assert forward_signals(m, official) == []

    def test_exchange_redirect_uses_the_delivery_address(self, rules: MailRules) -> None:
        m = msg(
            "mark.evans@example.net",
            [JANE, "helen.w@example.net"],
            "hello",
            headers=(
                ("X-MS-Exchange-Inbox-Rules-Loop", JANE),
                ("X-Original-To", "jsmith.teach@gmail.com"),
            ),
        )
        # helen.w@ is an original recipient, not where the rule sent it.
        assert [(s.mailbox, s.target) for s in forward_signals(m, official)] == [
            (JANE, "jsmith.teach@gmail.com")
        ]

    def test_forwarding_inside_the_organisation_is_not_a_finding(self, rules: MailRules) -> None:
        m = msg(
            "mark.evans@example.net",
            [JANE],
            "hello",
            headers=(("X-Forwarded-To", PRIYA), ("X-Forwarded-For", f"{JANE} {PRIYA}")),
        )
        assert rules.evaluate(m, now=NOW) == []

    def test_mailing_list_resend_is_not_forwarding(self, rules: MailRules) -> None:
        m = msg(
            "office@choysez.org.uk",
            ["families@choysez.org.uk"],
            "news",
            headers=(
                ("Resent-From", "families@choysez.org.uk"),
                ("Resent-To", "mark.evans@example.net"),
                ("List-Id", "<families.choysez.org.uk>"),
            ),
        )
        assert forward_signals(m, official) == []

    def test_inbox_rules(self, rules: MailRules, people: People, policy: Policy) -> None:
        seen = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
        inbox = [
            ForwardingRule(
                "graph",
                "Jane.Smith@choysez.org.uk",
                "to my gmail",
                ("jane.smith.teach@gmail.com",),
                True,
                seen,
            ),
            ForwardingRule("graph", JANE, "old rule", ("jsmith.teach@gmail.com",), False, seen),
            ForwardingRule("graph", PRIYA, "cover", (SAM,), True, seen, "redirect"),
            ForwardingRule(
                "graph", "office@choysez.org.uk", "shared", ("tom.baker@btinternet.com",), True, seen
            ),
            ForwardingRule("graph", "someone@gmail.com", "theirs", ("x@gmail.com",), True, seen),
        ]
        found = forwarding_findings(
            inbox, is_official=official, people=people, spec=policy.rules[FORWARD], now=NOW
        )
        assert {(f.subject.staff, f.subject.address) for f in found} == {
            (JANE, "jane.smith.teach@gmail.com"),
            ("office@choysez.org.uk", "tom.baker@btinternet.com"),
        }
        jane = next(f for f in found if f.subject.staff == JANE)
        _, (from_headers,) = evaluate_file(rules, "gmail-auto-forwarded-1.eml")
        assert jane.fingerprint == from_headers.fingerprint  # one arrangement, however it was seen
        assert jane.severity.value == "high" and jane.first_seen == seen
        assert "inbox rule 'to my gmail' in jane.smith@choysez.org.uk (forward)" in jane.reasons[0]
        office = next(f for f in found if f.subject.staff == "office@choysez.org.uk")
        assert "target is Tom Baker's declared personal address" in office.reasons
        assert rules.forwarding(inbox, now=NOW) == found


class TestPrivacy:
    """Findings carry metadata, reasons and matched names, never a sentence of the body."""

    @pytest.mark.parametrize("name", sorted(n for n, v in EXPECTED.items() if v))
    def test_no_body_sentence_in_evidence_or_reasons(self, rules: MailRules, name: str) -> None:
        m, found = evaluate_file(rules, name)
        stored = json.dumps([[dict(e.data) for e in f.evidence] + list(f.reasons) for f in found])
        body = own_text(m.text) + "\n" + m.text
        sentences = {
            s.strip()
            for s in re.split(r"[.?!\n]", body)
            if len(s.split()) >= 5 and not s.strip().startswith(("From:", "Subject:", "On ", ">"))
        }
        assert sentences  # the test would prove nothing on an empty body
        leaked = [s for s in sentences if s in stored]
        assert leaked == []


class TestQuotedParts:
    """Reading reply chains: where the author's own words end, and whose headers are quoted."""

    def test_outlook_and_gmail_headers(self) -> None:
        text = (
            "Thanks\n\nFrom: Smith, Jane [mailto:jane.smith@choysez.org.uk]\nSent: 23 November 2026 10:00\n"
            "To: x\n\nOn Mon, 23 Nov 2026 at 09:00, Mark Evans <mark.evans@example.net>\nwrote:\n> hi\n"
        )
        assert own_text(text).strip() == "Thanks"
        assert set(quoted_headers(text)) == {
            ("Smith, Jane", "jane.smith@choysez.org.uk"),
            ("Mark Evans", "mark.evans@example.net"),
        }

    def test_parsed_message_is_evaluated_end_to_end(self, rules: MailRules) -> None:
        raw = (
            b"From: Sam Okafor <samokafor88@gmail.com>\nTo: mark.evans@example.net\n"
            b"Subject: =?utf-8?q?Lily_Evans=E2=80=99_homework?=\n\n"
            b"Sent from my iPhone. Lily Evans\x92s trip consent form is due.\n\n"
            b"Sam Okafor\nTeaching Assistant\n"
        )
        m = parse_message(raw, source="t", location="t")
        (f,) = rules.evaluate(m, now=NOW)
        assert m.message_id is None and m.date is None
        assert f.evidence[0].key == "location:t" and f.first_seen == NOW
        assert f.evidence[0].data["confidence"] == "high"
