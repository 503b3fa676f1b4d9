"""The nouns of the pipeline: what sources yield, what rules produce, what the store keeps.

Frozen dataclasses with no I/O and no imports from the rest of the package, so every
stage can depend on them and tests can build them by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import StrEnum
from typing import TypeAlias

JSONValue: TypeAlias = "str | int | float | bool | list[JSONValue] | dict[str, JSONValue] | None"


class Severity(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class Status(StrEnum):
    OPEN = "open"
    APPROVED = "approved"
    CONFIRMED = "confirmed"
    DISMISSED = "dismissed"


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox from a header: the address is always lower-case."""

    email: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class MailMessage:
    """A message as a source read it. `text` lives in memory only and is never stored."""

    source: str
    location: str
    message_id: str | None
    date: datetime | None
    sender: Address | None
    to: tuple[Address, ...] = ()
    cc: tuple[Address, ...] = ()
    reply_to: tuple[Address, ...] = ()
    subject: str = ""
    text: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    defects: int = 0

    @property
    def key(self) -> str:
        """A stable identity for de-duplication: the Message-ID, else the location."""
        return self.message_id or f"location:{self.location}"


@dataclass(frozen=True, slots=True)
class NetObservation:
    """One name seen in one flow (or one log record), with the flow's totals where known.

    `service` and `category` are filled in by classification, not by sources.
    """

    source: str
    ts: datetime
    client: str
    server: str
    host: str
    via: str  # dns | tls-sni | quic-sni | http-host | log | ip-range
    bytes: int | None = None
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    flow: str | None = None
    service: str | None = None
    category: str | None = None


@dataclass(frozen=True, slots=True)
class ForwardingRule:
    """A mailbox rule or setting that forwards or redirects mail automatically (Graph, EWS, Sieve).

    Read from a server's inbox rules, not from a message; `targets` are lower-case addresses.
    """

    source: str
    mailbox: str
    name: str
    targets: tuple[str, ...]
    enabled: bool
    seen_at: datetime
    action: str = "forward"  # forward | redirect | forward-as-attachment | smtp-forwarding


@dataclass(frozen=True, slots=True)
class Subject:
    """Who or what a finding or an approval is about; unset parts are None."""

    staff: str | None = None
    address: str | None = None
    room: str | None = None
    device: str | None = None
    service: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def covers(self, other: Subject) -> bool:
        """True when every part set here is set to the same value (case-insensitive) in `other`."""
        mine = self.as_dict()
        theirs = other.as_dict()
        return bool(mine) and all(
            k in theirs and theirs[k].casefold() == v.casefold() for k, v in mine.items()
        )


@dataclass(frozen=True, slots=True)
class Evidence:
    """What a finding rests on: metadata and matched reasons, never message bodies.

    `key` identifies the observation (a message, a session) so that seeing it again adds nothing.
    """

    key: str
    observed_at: datetime
    data: Mapping[str, JSONValue]


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule's verdict on some input, before the store has seen it."""

    rule: str
    clauses: tuple[str, ...]
    severity: Severity
    subject: Subject
    fingerprint: str
    first_seen: datetime
    last_seen: datetime
    pupil_involved: bool
    evidence: tuple[Evidence, ...]
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StoredFinding:
    """A finding as the store keeps it: with its id, review status and history."""

    id: int
    rule: str
    clauses: tuple[str, ...]
    severity: Severity
    status: Status
    subject: Subject
    fingerprint: str
    first_seen: datetime
    last_seen: datetime
    occurrences: int
    pupil_involved: bool
    approval_id: int | None
    reasons: tuple[str, ...]
    created_at: datetime
    evidence: tuple[Evidence, ...] = ()
    reviewed_by: str | None = None
    review_note: str | None = None


@dataclass(frozen=True, slots=True)
class Approval:
    """A centre manager's prior approval of an exception to a rule."""

    id: int
    rule: str
    subject: Subject
    valid_from: datetime
    valid_until: datetime
    approved_by: str
    reason: str
    granted_at: datetime
    revoked_at: datetime | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None

    @property
    def effective_until(self) -> datetime:
        """A revocation ends an approval early; it never reaches back before the revocation."""
        if self.revoked_at is not None and self.revoked_at < self.valid_until:
            return self.revoked_at
        return self.valid_until

    def is_active(self, now: datetime) -> bool:
        return self.valid_from <= now < self.effective_until

    def covers(self, rule: str, subject: Subject, at: datetime) -> bool:
        """Whether this approval excuses `rule` for `subject` at the moment `at`."""
        return (
            self.rule == rule
            and self.subject.covers(subject)
            and self.valid_from <= at < self.effective_until
        )


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One pass of one source: the basis of source health in the digest."""

    id: int
    source: str
    kind: str
    started_at: datetime
    finished_at: datetime | None
    status: str  # running | ok | failed
    items: int = 0
    skipped: int = 0
    findings: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    details: Mapping[str, JSONValue] = field(default_factory=dict)
