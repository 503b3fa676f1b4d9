"""Mail rules: Choysez business sent from or to a staff member's personal address, and auto-forwarding.

Pure: a message (or a mailbox's forwarding rules), the directory, the policy and the time in; findings
out. The message text is looked at here and dropped; findings carry only metadata, reasons and the
names of matched terms and pupils, never a sentence of the body.

Who is staff. A personal address declared in staff.csv is staff ("declared"). An undeclared address at
a personal mail provider is tied to a staff member only by evidence in the message, and each piece is
a reason in the finding:

    strong (2 points)   Reply-To is the staff member's official address;
                        a sign-off with the staff name and a role ("Jane Smith, Year 6 Teacher")
    medium (1 point)    the display name is the staff name; a sign-off with the name alone
    supporting (1)      a quoted reply header showing the staff member's official address; an address
                        spelt like the name (jane.smith77@) -- counted only beside another piece

Two points or more is "high", one is "medium"; `[mail] undeclared_min_confidence` says which is
reported. A name shared with a community member (a parent named Jane Smith) counts only strong
evidence, and then at most "medium": a display name, a plain sign-off or a quoted header of the
teacher's message is exactly what that parent's own reply would show. An address listed in
community.csv is never staff, and a name shared by two staff members needs evidence that tells them
apart.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from auditd.directory import People, StaffMember, name_key
from auditd.model import Address, Evidence, Finding, ForwardingRule, JSONValue, MailMessage, Subject
from auditd.policy import MailPolicy, Policy, RuleSpec

SENDER = "MAIL-PERSONAL-SENDER"
RECIPIENT = "MAIL-PERSONAL-RECIPIENT"
FORWARD = "MAIL-AUTO-FORWARD"
SUBJECT_CAP = 200
ROLE_CAP = 60
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2013": "-", "\u2014": "-"})
_EMAIL = re.compile(r"[\w.+'=-]+@[\w-]+(?:\.[\w-]+)+", re.UNICODE)
CONFIDENCE_RANK = {"low": 0, "medium": 1, "high": 2, "declared": 3}
_STRONG = frozenset({"reply-to", "signoff-role"})
_MEDIUM = frozenset({"display", "signoff"})


def fingerprint(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


# ---- is it Choysez business? ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Score:
    """A business score with every point's reason, the matched term names and the pupils named."""

    points: int
    reasons: tuple[str, ...]
    terms: tuple[str, ...]
    pupils: tuple[str, ...]
    pupil_involved: bool


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
    def _places(self) -> re.Pattern[str] | None:
        return _alternation(self.policy.places)

    @cached_property
    def _pupils(self) -> re.Pattern[str] | None:
        return _alternation(self.pupils)

    def score(self, msg: MailMessage, community: Iterable[str]) -> Score:
        """Score `msg`; `community` is the relationships (pupil, parent, carer) of its correspondents."""
        # Typographic apostrophes (Outlook, Apple Mail) match plain ones; addresses say who, not what
        # (choysez.org.uk in a quoted header is not a mention of Choysez).
        text = _EMAIL.sub(" ", f"{msg.subject}\n{msg.text}".translate(_APOSTROPHES))
        points = 0
        reasons: list[str] = []
        involved = False
        relations = sorted(set(community))
        if relations:
            points += self.policy.community_recipient_weight
            reasons.append("correspondent is community: " + ", ".join(relations))
            involved = "pupil" in relations
        named: list[str] = []
        if self._pupils is not None:
            canonical = {p.casefold(): p for p in self.pupils}
            named = sorted(
                {canonical.get(m.group(0).casefold(), m.group(0)) for m in self._pupils.finditer(text)}
            )
            if named:
                points += self.policy.pupil_weight
                reasons.append("mentions pupil")
                involved = True
        if self._orgs is not None and self._orgs.search(text):
            points += self.policy.org_weight
            reasons.append("mentions " + self.policy.org_names[0])
        if self._places is not None:
            places = sorted({m.group(0) for m in self._places.finditer(text)}, key=str.casefold)
            if places:
                points += self.policy.place_weight
                reasons.append("mentions place: " + ", ".join(places))
        hits: list[str] = []
        if self._terms is not None:
            hits = sorted({m.group(0).lower() for m in self._terms.finditer(text)})
            if hits:
                weights = {k.lower(): w for k, w in self.policy.terms.items()}
                points += sum(weights.get(h, 1) for h in hits)
                reasons.append("business terms: " + ", ".join(hits))
        return Score(points, tuple(reasons), tuple(hits), tuple(named), involved)


def _alternation(words: Iterable[str]) -> re.Pattern[str] | None:
    items = sorted({w.translate(_APOSTROPHES) for w in words if w.strip()}, key=len, reverse=True)
    if not items:
        return None
    body = "|".join(re.escape(w) for w in items)
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)


# ---- not contact: auto-replies, bounces, lists, newsletters -------------------------------------


def _header_map(msg: MailMessage) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in msg.headers:
        out.setdefault(k.lower(), []).append(v)
    return out


def automatic_kind(msg: MailMessage, policy: MailPolicy | None = None) -> str | None:
    """Why a message is not contact between people (auto-reply, bounce, list, newsletter), or None."""
    policy = policy or MailPolicy()
    h = {k: v[0].strip().lower() for k, v in _header_map(msg).items()}
    auto = h.get("auto-submitted", "no").split(";")[0].strip()
    if auto not in ("", "no"):
        return f"automatic message (Auto-Submitted: {auto})"
    if h.get("precedence", "") in ("bulk", "list", "junk", "auto_reply"):
        return f"bulk mail (Precedence: {h['precedence']})"
    for name in ("list-id", "list-unsubscribe", "list-post"):
        if name in h:
            return "mailing list or newsletter (List-* headers)"
    if "feedback-id" in h or "x-campaign" in h:
        return "newsletter (bulk-sender headers)"
    if "x-autoreply" in h or "x-autorespond" in h:
        return "auto-reply (X-Autoreply)"
    if h.get("content-type", "").startswith("multipart/report"):
        return "delivery report (multipart/report)"
    if h.get("return-path", "").replace(" ", "") == "<>":
        return "bounce (empty return path)"
    subject = msg.subject.strip().lower()
    for prefix in policy.automatic_subjects:
        if subject.startswith(prefix.lower()):
            return f"auto-reply or bounce (subject starts '{prefix}')"
    local = msg.sender.email.partition("@")[0] if msg.sender else ""
    for name in policy.automatic_senders:
        if local == name or re.match(rf"{re.escape(name)}[-+._]", local):
            return f"automatic sender ({name}@)"
    return None


def is_automatic(msg: MailMessage, policy: MailPolicy | None = None) -> bool:
    """Auto-replies, bounces, mailing lists and newsletters are not contact between people."""
    return automatic_kind(msg, policy) is not None


def _is_auto_reply(msg: MailMessage, policy: MailPolicy) -> bool:
    """An auto-reply, out-of-office or bounce: Exchange marks these with its inbox-rule headers too."""
    h = {k: v[0].strip().lower() for k, v in _header_map(msg).items()}
    subject = msg.subject.strip().lower()
    return (
        h.get("auto-submitted", "").startswith("auto-replied")
        or "x-autoreply" in h
        or "x-autorespond" in h
        or h.get("content-type", "").startswith("multipart/report")
        or h.get("return-path", "").replace(" ", "") == "<>"
        or any(subject.startswith(p.lower()) for p in policy.automatic_subjects)
    )


# ---- reading the body for identity (in memory only) --------------------------------------------

_QUOTE_START = re.compile(
    r"^(?:>"
    r"|On\b[^\n]{0,300}(?:\n[^\n]{0,300}){0,2}?\bwrote:\s*$"
    r"|-{2,}\s*Original Message\s*-{2,}"
    r"|-{2,}\s*Forwarded message\s*-{2,}"
    r"|Begin forwarded message:"
    r"|_{10,}\s*$"
    r"|\*?From:\*?\s[^\n]+\n(?:[^\n]*\n){0,3}?\*?(?:Sent|Date):)",
    re.M | re.I,
)
_ON_WROTE = re.compile(
    r"^On\b(?P<head>[^\n]{0,300}(?:\n[^\n]{0,300}){0,2}?)\bwrote:\s*$",
    re.M | re.I,
)
_FROM_BLOCK = re.compile(
    r"^\*?From:\*?\s*(?P<name>[^<\[\n]*?)\s*[<\[](?:mailto:)?(?P<addr>[^>\]\s]+@[^>\]\s]+)[>\]]"
    r"[^\n]*\n(?:[^\n]*\n){0,3}?\*?(?:Sent|Date):",
    re.M | re.I,
)
_QUOTE_PREFIX = re.compile(r"^(?:[ \t]*>)+[ \t]?", re.M)
_SIGNOFF_SPLIT = re.compile(r"\s*(?:,|\||\s-\s|\s–\s|/)\s*")


def own_text(text: str) -> str:
    """The author's own words: the text before the first quoted or forwarded part."""
    m = _QUOTE_START.search(text)
    return text[: m.start()] if m else text


def quoted_headers(text: str) -> list[tuple[str, str]]:
    """(name, address) of each quoted header: "On ... X <a> wrote:", Outlook's "From: ... Sent:" block."""
    out: list[tuple[str, str]] = []
    text = _QUOTE_PREFIX.sub("", text)  # headers quoted inside quotes ("> On ... wrote:")
    for m in _ON_WROTE.finditer(text):
        head = " ".join(m.group("head").split())
        found = list(_EMAIL.finditer(head))
        if not found:
            continue
        last = found[-1]
        before = head[: last.start()].rstrip(" <[(")
        name = before.rpartition(",")[2].strip().strip('"')
        out.append((name, last.group(0).lower()))
    for m in _FROM_BLOCK.finditer(text):
        out.append((m.group("name").strip().strip('"'), m.group("addr").lower()))
    return out


@dataclass(frozen=True, slots=True)
class SignOff:
    staff: StaffMember
    role: str  # the role phrase beside the name, "" when signed with the name alone


# ---- who is staff ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """A staff member an address belongs to, how sure that is, and what tied them."""

    staff: StaffMember
    confidence: str  # declared | high | medium | low
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Identifier:
    """Ties personal addresses to staff members: staff.csv first, then evidence in the message."""

    people: People
    policy: Policy
    is_official: Callable[[str], bool]

    @property
    def mail(self) -> MailPolicy:
        return self.policy.mail

    @cached_property
    def _roles(self) -> re.Pattern[str] | None:
        return _alternation([*self.mail.role_words, *self.mail.org_names])

    def _candidate(self, email: str) -> bool:
        """An address that may be an undeclared personal address of staff."""
        return (
            self.mail.identify_undeclared
            and not self.is_official(email)
            and email not in self.people.community_by_email
            and self.policy.is_personal_provider(email)
        )

    def _role_in(self, phrase: str, staff: StaffMember) -> str:
        phrase = " ".join(phrase.split())
        if not phrase or len(phrase) > ROLE_CAP or len(phrase.split()) > 8:
            return ""
        own = staff.role.strip()
        if own and re.search(rf"(?<!\w){re.escape(own)}(?!\w)", phrase, re.I):
            return phrase
        if self._roles is not None and self._roles.search(phrase):
            return phrase
        return ""

    def signoffs(self, text: str) -> list[SignOff]:
        """Staff names signing the author's own text, with the role beside them when there is one."""
        lines = [line.strip(" \t*_-–>") for line in own_text(text).splitlines()]
        lines = [line for line in lines if line][-self.mail.signoff_lines :]
        out: list[SignOff] = []
        for i, line in enumerate(lines):
            if len(line) > 100:
                continue
            parts = [p for p in _SIGNOFF_SPLIT.split(line) if p]
            for j, part in enumerate(parts):
                for staff in self.people.staff_by_name.get(name_key(part), ()) if " " in part.strip() else ():
                    beside = ", ".join(parts[j + 1 :])
                    role = self._role_in(beside, staff) if beside else ""
                    if not role and i + 1 < len(lines):
                        role = self._role_in(lines[i + 1], staff)
                    out.append(SignOff(staff, role))
        return out

    def _decide(self, evidence: dict[str, list[tuple[str, str]]]) -> Identity | None:
        """The best-supported staff member, per the point scheme in the module docstring."""
        by_email = {s.email: s for s in self.people.staff}
        best: list[Identity] = []
        best_rank = (0, 0)
        for email, items in evidence.items():
            staff = by_email[email]
            kinds = {k for k, _ in items}
            shared = self.people.community_by_name.get(name_key(staff.name), ())
            reasons = [r for _, r in items]
            if shared:
                kept = [(k, r) for k, r in items if k in _STRONG]
                who = ", ".join(sorted({c.relationship for c in shared}))
                reasons = [r for _, r in kept]
                reasons.append(
                    f"name {staff.name} is shared with a community member ({who}): "
                    "only strong evidence counts"
                )
                kinds = {k for k, _ in kept}
            points = sum(2 if k in _STRONG else 1 for k in kinds if k in _STRONG or k in _MEDIUM)
            if points:
                points += sum(1 for k in kinds if k not in _STRONG and k not in _MEDIUM)
            confidence = "high" if points >= 2 else "medium" if points == 1 else "low"
            if shared and confidence == "high":
                confidence = "medium"
            if not points:
                continue
            rank = (CONFIDENCE_RANK[confidence], points)
            identity = Identity(staff, confidence, tuple(reasons))
            if not best or rank > best_rank:
                best, best_rank = [identity], rank
            elif rank == best_rank:
                best.append(identity)
        if len(best) != 1:
            return None  # nothing, or two staff members equally likely: not enough to name anyone
        return best[0]

    def reportable(self, identity: Identity | None) -> Identity | None:
        if identity is None:
            return None
        need = CONFIDENCE_RANK[self.mail.undeclared_min_confidence]
        return identity if CONFIDENCE_RANK[identity.confidence] >= need else None

    def sender(self, msg: MailMessage) -> Identity | None:
        """Whose personal address sent `msg`, if any staff member's (declared or by evidence)."""
        if msg.sender is None:
            return None
        addr = msg.sender.email
        declared = self.people.by_personal.get(addr)
        if declared is not None:
            why = f"sender is {declared.name}'s personal address (declared in staff.csv)"
            return Identity(declared, "declared", (why,))
        if not self._candidate(addr):
            return None
        evidence: dict[str, list[tuple[str, str]]] = {}

        def add(staff: StaffMember, kind: str, why: str) -> None:
            items = evidence.setdefault(staff.email, [])
            if all(k != kind for k, _ in items):
                items.append((kind, why))

        for s in self.people.staff_by_name.get(name_key(msg.sender.name), ()) if msg.sender.name else ():
            add(s, "display", f"display name matches staff {s.name}")
        for sig in self.signoffs(msg.text):
            if sig.role:
                add(sig.staff, "signoff-role", f"signed '{sig.staff.name}, {sig.role}'")
            else:
                add(sig.staff, "signoff", f"signed '{sig.staff.name}'")
        for a in msg.reply_to:
            owner = self.people.by_official.get(a.email)
            if owner is not None:
                add(owner, "reply-to", f"Reply-To is {owner.name}'s official address {a.email}")
        for _name, quoted in quoted_headers(msg.text):
            owner = self.people.by_official.get(quoted)
            if owner is not None and owner.email in evidence:
                add(owner, "quoted", f"quoted reply header shows {owner.name} <{quoted}>")
        local = name_key(addr.partition("@")[0])
        for email in list(evidence):
            staff = self.people.by_official[email]
            if local and local == name_key(staff.name):
                add(staff, "address", f"address {addr} is spelt like {staff.name}")
        return self.reportable(self._decide(evidence)) if evidence else None

    def recipient(self, msg: MailMessage, rcpt: Address) -> Identity | None:
        """Whose personal address `rcpt` is, if any staff member's (declared or by evidence)."""
        declared = self.people.by_personal.get(rcpt.email)
        if declared is not None:
            return Identity(declared, "declared", ())
        if not rcpt.name or not self._candidate(rcpt.email):
            return None
        evidence: dict[str, list[tuple[str, str]]] = {}
        sender = msg.sender.email if msg.sender else ""
        for s in self.people.staff_by_name.get(name_key(rcpt.name), ()):
            items = [("display", f"recipient display name matches staff {s.name}")]
            if sender == s.email:
                items.append(("self", f"sent from {s.name}'s own official address"))
            evidence[s.email] = items
        decided = self._decide(evidence) if evidence else None
        return self.reportable(decided)


# ---- auto-forwarding seen in headers ---------------------------------------------------------

_CAF = re.compile(
    r"^(?P<local>[^\s<>@+]+)\+caf_=(?P<tlocal>[^\s<>@=]+)=(?P<tdomain>[^\s<>@=]+)@(?P<domain>[\w.-]+)$"
)
_SRS = re.compile(r"^srs[01][=+-][^@]*@(?P<domain>[\w.-]+)$", re.I)


def _addrs(values: Iterable[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        for m in _EMAIL.finditer(v):
            a = m.group(0).lower().strip(".")
            if a not in out:
                out.append(a)
    return out


@dataclass(frozen=True, slots=True)
class ForwardSignal:
    mailbox: str
    target: str
    reasons: tuple[str, ...]


def forward_signals(
    msg: MailMessage, is_official: Callable[[str], bool], policy: MailPolicy | None = None
) -> list[ForwardSignal]:
    """(official mailbox, outside target) pairs that the message's headers show forwarding between."""
    policy = policy or MailPolicy()
    h = _header_map(msg)
    found: dict[tuple[str, str], list[str]] = {}

    def signal(mailboxes: Iterable[str], targets: Iterable[str], why: str) -> None:
        for mbox in mailboxes:
            if not is_official(mbox):
                continue
            for t in targets:
                if is_official(t) or t == mbox:
                    continue
                reasons = found.setdefault((mbox, t), [])
                if why not in reasons:
                    reasons.append(why)

    delivered = _addrs([*h.get("delivered-to", []), *h.get("x-original-to", [])])
    rcpts = [a.email for a in (*msg.to, *msg.cc)]
    official_rcpts = [a for a in (*delivered, *rcpts) if is_official(a)]
    outside_delivery = [a for a in delivered if not is_official(a)]
    sender = msg.sender.email if msg.sender else ""

    # Gmail / Google Workspace automatic forwarding.
    if "x-forwarded-to" in h:
        sources = _addrs(h.get("x-forwarded-for", []))[:1] or official_rcpts
        signal(sources, _addrs(h["x-forwarded-to"]), "X-Forwarded-To header (automatic forwarding)")
    for value in (*h.get("return-path", []), *h.get("x-forwarded-for", []), *h.get("delivered-to", [])):
        for a in _addrs([value]):
            m = _CAF.match(a)
            if m:
                mbox = f"{m['local']}@{m['domain']}"
                signal(
                    [mbox],
                    [f"{m['tlocal']}@{m['tdomain']}"],
                    "envelope sender with +caf_= (Gmail forwarding)",
                )
            srs = _SRS.match(a)
            if srs and is_official(f"x@{srs['domain']}"):
                targets = outside_delivery or _addrs(h.get("x-forwarded-to", []))
                signal(
                    official_rcpts[:1],
                    targets,
                    f"SRS envelope sender rewritten by {srs['domain']} (forwarded)",
                )
    # Resent-* (redirect), not a mailing list's resending.
    is_list = any(k in h for k in ("list-id", "list-post", "list-unsubscribe"))
    if ("resent-to" in h or "resent-cc" in h) and not is_list:
        frm = _addrs([*h.get("resent-from", []), *h.get("resent-sender", [])])
        signal(
            frm, _addrs([*h.get("resent-to", []), *h.get("resent-cc", [])]), "Resent-From/Resent-To headers"
        )
    # Exchange inbox rules. An auto-reply carries the same headers: that is not forwarding.
    if not _is_auto_reply(msg, policy):
        loop = _addrs(h.get("x-ms-exchange-inbox-rules-loop", []))
        generated = any("rules" in v.lower() for v in h.get("x-ms-exchange-generated-message-source", []))
        if loop or generated:
            mailboxes = loop or ([sender] if sender else [])
            targets = outside_delivery or (
                [r for r in rcpts if not is_official(r)] if sender in mailboxes else []
            )
            why = (
                "X-MS-Exchange-Inbox-Rules-Loop header (Exchange inbox rule)"
                if loop
                else "X-MS-Exchange-Generated-Message-Source: Mailbox Rules Agent"
            )
            signal(mailboxes, targets, why)
        auto = (h.get("auto-submitted") or [""])[0].strip().lower()
        if auto.startswith("auto-forwarded"):
            signal(
                official_rcpts[:1] or ([sender] if sender else []),
                outside_delivery,
                "Auto-Submitted: auto-forwarded",
            )
    return [ForwardSignal(m, t, tuple(r)) for (m, t), r in found.items()]


# ---- the rules -------------------------------------------------------------------------------


def _observed(msg: MailMessage, now: datetime) -> datetime:
    return msg.date or now


def _message_data(msg: MailMessage) -> dict[str, JSONValue]:
    """What identifies a message: never its body."""
    return {
        "message_id": msg.message_id,
        "date": msg.date.isoformat() if msg.date else None,
        "from": msg.sender.email if msg.sender else None,
        "to": [a.email for a in msg.to],
        "cc": [a.email for a in msg.cc],
        "subject": msg.subject[:SUBJECT_CAP],
        "source": msg.source,
        "location": msg.location,
    }


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

    @cached_property
    def identify(self) -> Identifier:
        return Identifier(self.people, self.policy, self.is_official)

    def _enabled(self, rule: str) -> bool:
        spec = self.policy.rules.get(rule)
        return spec is not None and spec.enabled

    def evaluate(self, msg: MailMessage, *, now: datetime) -> list[Finding]:
        findings: list[Finding] = []
        if self._enabled(FORWARD):
            findings.extend(self._forwarding(msg, now))
        if msg.sender is None or is_automatic(msg, self.policy.mail):
            return findings
        recipients = (*msg.to, *msg.cc)
        if self._enabled(SENDER):
            who = self.identify.sender(msg)
            if who is not None:
                mine = {*who.staff.personal_emails, msg.sender.email}
                others = [a for a in recipients if a.email not in mine]
                why = list(who.reasons)
                if who.confidence != "declared":
                    why.insert(
                        0,
                        f"sender {msg.sender.email} is probably {who.staff.name} "
                        f"({who.confidence} confidence)",
                    )
                f = self._finding(SENDER, msg, who, msg.sender.email, others, now, why)
                if f is not None:
                    findings.append(f)
        if self._enabled(RECIPIENT):
            official = self.is_official(msg.sender.email)
            from_community = msg.sender.email in self.people.community_by_email
            if official or from_community:
                how = "forwarded or sent from an official account" if official else "community member wrote"
                for rcpt in recipients:
                    if rcpt.email == msg.sender.email:
                        continue
                    who = self.identify.recipient(msg, rcpt)
                    if who is None:
                        continue
                    if who.confidence == "declared":
                        why = [f"recipient is {who.staff.name}'s personal address ({how})"]
                    else:
                        why = [
                            f"recipient {rcpt.email} is probably {who.staff.name}'s personal address "
                            f"({who.confidence} confidence; {how})",
                            *who.reasons,
                        ]
                    others = [msg.sender, *(a for a in recipients if a.email != rcpt.email)]
                    f = self._finding(RECIPIENT, msg, who, rcpt.email, others, now, why)
                    if f is not None:
                        findings.append(f)
        return findings

    def _correspondents(self, correspondents: Iterable[Address]) -> tuple[list[str], bool]:
        """Community relationships among the correspondents, and whether they are all staff."""
        people = list(correspondents)
        community = [
            c.relationship for a in people if (c := self.people.community_by_email.get(a.email)) is not None
        ]
        staff_only = bool(people) and all(
            self.is_official(a.email) or a.email in self.people.by_personal for a in people
        )
        return community, staff_only

    def _finding(
        self,
        rule: str,
        msg: MailMessage,
        who: Identity,
        personal: str,
        correspondents: Iterable[Address],
        now: datetime,
        why: list[str],
    ) -> Finding | None:
        community, staff_only = self._correspondents(correspondents)
        score = self.business.score(msg, community)
        threshold = self.business.threshold
        reasons = [*why, *score.reasons]
        if staff_only:
            # Between colleagues (or to oneself) a personal matter must not pass for business.
            threshold = max(threshold, self.policy.mail.colleague_threshold)
            reasons.append(f"only staff among the correspondents: business needs a score of {threshold}")
        if score.points < threshold:
            return None
        seen = _observed(msg, now)
        spec = self.policy.rules[rule]
        data = _message_data(msg)
        data.update(
            {
                "score": score.points,
                "threshold": threshold,
                "confidence": who.confidence,
                "reasons": list(reasons),
                "terms": list(score.terms),
                "pupils": list(score.pupils),
            }
        )
        return Finding(
            rule=rule,
            clauses=tuple(spec.clauses),
            severity=spec.severity,
            subject=Subject(staff=who.staff.email, address=personal),
            fingerprint=fingerprint(rule, who.staff.email, personal, msg.key),
            first_seen=seen,
            last_seen=seen,
            pupil_involved=score.pupil_involved,
            evidence=(Evidence(key=msg.key, observed_at=seen, data=data),),
            reasons=tuple(reasons),
        )

    def _forwarding(self, msg: MailMessage, now: datetime) -> list[Finding]:
        signals = forward_signals(msg, self.is_official, self.policy.mail)
        if not signals:
            return []
        spec = self.policy.rules[FORWARD]
        relations, _ = self._correspondents([*([msg.sender] if msg.sender else []), *msg.to, *msg.cc])
        score = self.business.score(msg, relations)
        seen = _observed(msg, now)
        out: list[Finding] = []
        for sig in signals:
            reasons = [
                f"mail to official mailbox {sig.mailbox} is forwarded automatically to {sig.target}",
                *sig.reasons,
                *_target_reasons(sig.target, self.people, self.policy),
                *(["mentions pupil"] if score.pupils else []),
            ]
            data = _message_data(msg)
            data.update(
                {
                    "mailbox": sig.mailbox,
                    "target": sig.target,
                    "reasons": list(reasons),
                    "terms": list(score.terms),
                    "pupils": list(score.pupils),
                }
            )
            out.append(
                Finding(
                    rule=FORWARD,
                    clauses=tuple(spec.clauses),
                    severity=spec.severity,
                    subject=Subject(staff=sig.mailbox, address=sig.target),
                    fingerprint=fingerprint(FORWARD, sig.mailbox, sig.target),
                    first_seen=seen,
                    last_seen=seen,
                    pupil_involved=score.pupil_involved,
                    evidence=(Evidence(key=msg.key, observed_at=seen, data=data),),
                    reasons=tuple(reasons),
                )
            )
        return out

    def forwarding(self, rules: Iterable[ForwardingRule], *, now: datetime) -> list[Finding]:
        """MAIL-AUTO-FORWARD from mailboxes' inbox rules (see `forwarding_findings`)."""
        if not self._enabled(FORWARD):
            return []
        return forwarding_findings(
            rules, is_official=self.is_official, people=self.people, spec=self.policy.rules[FORWARD], now=now
        )


def _target_reasons(target: str, people: People, policy: Policy | None) -> list[str]:
    owner = people.by_personal.get(target)
    if owner is not None:
        return [f"target is {owner.name}'s declared personal address"]
    if target in people.community_by_email:
        return [f"target is a community address ({people.community_by_email[target].relationship})"]
    if policy is not None and policy.personal_providers and policy.is_personal_provider(target):
        return ["target is at a personal mail provider"]
    return ["target is outside the official domains"]


def forwarding_findings(
    rules: Iterable[ForwardingRule],
    *,
    is_official: Callable[[str], bool],
    people: People,
    spec: RuleSpec,
    now: datetime,
) -> list[Finding]:
    """MAIL-AUTO-FORWARD for enabled inbox rules of official mailboxes that send mail outside.

    One finding per (mailbox, target), with the same fingerprint as forwarding seen in message
    headers, so the store counts one arrangement however it was seen.
    """
    out: list[Finding] = []
    for rule in rules:
        mailbox = rule.mailbox.strip().lower()
        if not rule.enabled or not is_official(mailbox):
            continue
        seen = min(rule.seen_at, now)
        for target in dict.fromkeys(t.strip().lower() for t in rule.targets):
            if not target or is_official(target):
                continue
            owner = people.by_official.get(mailbox)
            reasons = [
                f"inbox rule '{rule.name}' in {mailbox} ({rule.action}) sends mail to {target}",
                *([] if owner else [f"{mailbox} is not a staff member's mailbox in staff.csv"]),
                *_target_reasons(target, people, None),
            ]
            data: dict[str, JSONValue] = {
                "source": rule.source,
                "mailbox": mailbox,
                "rule_name": rule.name,
                "action": rule.action,
                "target": target,
                "targets": list(rule.targets),
                "seen_at": rule.seen_at.isoformat(),
                "reasons": list(reasons),
            }
            out.append(
                Finding(
                    rule=FORWARD,
                    clauses=tuple(spec.clauses),
                    severity=spec.severity,
                    subject=Subject(staff=mailbox, address=target),
                    fingerprint=fingerprint(FORWARD, mailbox, target),
                    first_seen=seen,
                    last_seen=seen,
                    pupil_involved=False,
                    evidence=(
                        Evidence(
                            key=f"inbox-rule:{rule.source}:{mailbox}:{rule.name}", observed_at=seen, data=data
                        ),
                    ),
                    reasons=tuple(reasons),
                )
            )
    return out
