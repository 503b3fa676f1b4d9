"""Mail rules: Choysez business sent from or to a staff member's personal address.

Pure: a message, the directory and the policy in; findings out. The message text is looked at
here and dropped; findings carry only metadata, reasons and the names of matched terms.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from auditd.directory import People, StaffMember
from auditd.model import Address, Evidence, Finding, JSONValue, MailMessage, Subject
from auditd.policy import MailPolicy, Policy

SENDER = "MAIL-PERSONAL-SENDER"
RECIPIENT = "MAIL-PERSONAL-RECIPIENT"
SUBJECT_CAP = 200
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def fingerprint(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class BusinessTest:
    """Is a message Choysez business? A transparent score whose every point has a reason."""

    policy: MailPolicy
    pupils: tuple[str, ...]
    threshold: int

    @cached_property
    def _terms(self) -> re.Pattern[str] | None:
        return _alternation(self.policy.terms)

    @cached_property
    def _orgs(self) -> re.Pattern[str] | None:
        return _alternation(self.policy.org_names)

    @cached_property
    def _pupils(self) -> re.Pattern[str] | None:
        return _alternation(self.pupils)

    def score(self, msg: MailMessage, community: Iterable[str]) -> tuple[int, list[str], list[str], bool]:
        """Score, reasons, pupils named, and whether a pupil is involved."""
        # Typographic apostrophes (Outlook, Apple Mail) are matched as plain ones.
        text = f"{msg.subject}\n{msg.text}".translate(_APOSTROPHES)
        score = 0
        reasons: list[str] = []
        involved = False
        relations = sorted(set(community))
        if relations:
            score += self.policy.community_recipient_weight
            reasons.append("correspondent is community: " + ", ".join(relations))
            involved = "pupil" in relations
        named: list[str] = []
        if self._pupils is not None:
            named = sorted({m.group(0).title() for m in self._pupils.finditer(text)})
            if named:
                score += self.policy.pupil_weight
                reasons.append("mentions pupil")
                involved = True
        if self._orgs is not None and self._orgs.search(text):
            score += self.policy.org_weight
            reasons.append("mentions " + self.policy.org_names[0])
        if self._terms is not None:
            hits = {m.group(0).lower() for m in self._terms.finditer(text)}
            if hits:
                weights = {k.lower(): w for k, w in self.policy.terms.items()}
                score += sum(weights.get(h, 1) for h in hits)
                reasons.append("business terms: " + ", ".join(sorted(hits)))
        return score, reasons, named, involved


def _alternation(words: Iterable[str]) -> re.Pattern[str] | None:
    items = sorted({w for w in words if w.strip()}, key=len, reverse=True)
    if not items:
        return None
    body = "|".join(re.escape(w) for w in items)
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)


def is_automatic(msg: MailMessage) -> bool:
    """Auto-replies, bounces, mailing lists and newsletters are not contact between people."""
    headers = {k.lower(): v.lower() for k, v in msg.headers}
    if headers.get("auto-submitted", "no").strip() not in ("", "no"):
        return True
    if headers.get("precedence", "").strip() in ("bulk", "list", "junk", "auto_reply"):
        return True
    if "list-id" in headers or "list-unsubscribe" in headers or "x-autoreply" in headers:
        return True
    sender = msg.sender.email if msg.sender else ""
    return sender.startswith(("mailer-daemon@", "postmaster@", "no-reply@", "noreply@"))


@dataclass(frozen=True)
class MailRules:
    """The mail rules bound to one organisation's directory and policy."""

    people: People
    policy: Policy
    is_official: Callable[[str], bool]
    threshold: int | None = None

    @cached_property
    def business(self) -> BusinessTest:
        return BusinessTest(
            self.policy.mail,
            self.people.pupil_names,
            self.threshold or self.policy.mail.business_threshold,
        )

    def evaluate(self, msg: MailMessage, *, now: datetime) -> list[Finding]:
        if msg.sender is None or is_automatic(msg):
            return []
        findings: list[Finding] = []
        recipients = (*msg.to, *msg.cc)
        owner = self.people.by_personal.get(msg.sender.email)
        if owner is not None and self.policy.rules[SENDER].enabled:
            others = [a for a in recipients if a.email not in owner.personal_emails]
            f = self._finding(
                SENDER,
                msg,
                owner,
                msg.sender.email,
                others,
                now,
                f"sender is {owner.name}'s personal address (declared in staff.csv)",
            )
            if f is not None:
                findings.append(f)
        if self.policy.rules[RECIPIENT].enabled:
            for rcpt in recipients:
                staff = self.people.by_personal.get(rcpt.email)
                if staff is None or rcpt.email == msg.sender.email:
                    continue
                official = self.is_official(msg.sender.email)
                from_community = msg.sender.email in self.people.community_by_email
                if not (official or from_community):
                    continue
                how = "forwarded or sent from an official account" if official else "community member wrote"
                others = [msg.sender, *(a for a in recipients if a.email != rcpt.email)]
                f = self._finding(
                    RECIPIENT,
                    msg,
                    staff,
                    rcpt.email,
                    others,
                    now,
                    f"recipient is {staff.name}'s personal address ({how})",
                )
                if f is not None:
                    findings.append(f)
        return findings

    def _finding(
        self,
        rule: str,
        msg: MailMessage,
        staff: StaffMember,
        personal: str,
        correspondents: Iterable[Address],
        now: datetime,
        why: str,
    ) -> Finding | None:
        community = [
            c.relationship
            for a in correspondents
            if (c := self.people.community_by_email.get(a.email)) is not None
        ]
        score, reasons, pupils, involved = self.business.score(msg, community)
        if score < self.business.threshold:
            return None
        seen = msg.date or now
        spec = self.policy.rules[rule]
        data: dict[str, JSONValue] = {
            "message_id": msg.message_id,
            "date": msg.date.isoformat() if msg.date else None,
            "from": msg.sender.email if msg.sender else None,
            "to": [a.email for a in msg.to],
            "cc": [a.email for a in msg.cc],
            "subject": msg.subject[:SUBJECT_CAP],
            "source": msg.source,
            "location": msg.location,
            "score": score,
            "reasons": [why, *reasons],
            "pupils": list(pupils),
        }
        return Finding(
            rule=rule,
            clauses=tuple(spec.clauses),
            severity=spec.severity,
            subject=Subject(staff=staff.email, address=personal),
            fingerprint=fingerprint(rule, staff.email, personal, msg.key),
            first_seen=seen,
            last_seen=seen,
            pupil_involved=involved,
            evidence=(Evidence(key=msg.key, observed_at=seen, data=data),),
            reasons=(why, *reasons),
        )
