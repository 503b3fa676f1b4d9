"""The policy as data: rules with the clauses they cite, domain lists, and the classifier.

Everything here is read from `policies/` (or a folder the config names) so that an admin can
read and change it without reading code. The classifier is pure.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from auditd.classifier import Classification
from auditd.classifier import Classifier as Classifier  # where it lived before
from auditd.classifier import default_policy_dir as default_policy_dir
from auditd.errors import ConfigError
from auditd.model import Severity
from auditd.tomlmodel import Strict, load_toml

RULE_IDS = (
    "MAIL-PERSONAL-SENDER",
    "MAIL-PERSONAL-RECIPIENT",
    "MAIL-AUTO-FORWARD",
    "NET-STREAMING-IN-CLASS",
)
Recipient = Literal["ict_manager", "centre_manager", "dsl", "dsl_if_pupil"]


def _domain(value: str) -> str:
    name = value.strip().lower().rstrip(".")
    labels = name.split(".")
    if not name or any(not label or len(label) > 63 for label in labels) or " " in name:
        raise ValueError(f"not a domain name: {value!r}")
    return name


# ---- rules.toml -----------------------------------------------------------------------------


class Clause(Strict):
    text: Annotated[str, Field(min_length=10)]


class RuleSpec(Strict):
    id: Literal[
        "MAIL-PERSONAL-SENDER", "MAIL-PERSONAL-RECIPIENT", "MAIL-AUTO-FORWARD", "NET-STREAMING-IN-CLASS"
    ]
    title: str
    clauses: Annotated[list[str], Field(min_length=1)]
    severity: Severity
    recipients: list[Recipient]
    description: str
    enabled: bool = True


class MailPolicy(Strict):
    business_threshold: Annotated[int, Field(ge=1)] = 2
    org_names: list[str] = ["Choysez"]
    org_weight: int = 1
    pupil_weight: int = 2
    community_recipient_weight: int = 2
    terms: dict[str, int] = {}
    # Choysez's places (sites, buildings) that count like its name.
    places: list[str] = []
    place_weight: int = 1
    # Only staff among the correspondents (a chat between colleagues, or a staff member writing to
    # themselves): business needs this higher score, so a personal matter that happens to say
    # "term" or "class" is not business.
    colleague_threshold: Annotated[int, Field(ge=1)] = 4
    # Undeclared personal addresses: a personal-provider address tied to a staff member by evidence.
    identify_undeclared: bool = True
    undeclared_min_confidence: Literal["high", "medium"] = "medium"
    signoff_lines: Annotated[int, Field(ge=1, le=50)] = 8
    role_words: list[str] = [
        "Teacher",
        "Teaching Assistant",
        "Youth Worker",
        "Form Tutor",
        "Head of",
        "Deputy",
        "Centre Manager",
        "SENCO",
        "Safeguarding Lead",
        "Coordinator",
        "Year",
    ]
    # Not contact between people: subject prefixes of auto-replies and bounces, and sender mailboxes.
    automatic_subjects: list[str] = [
        "Automatic reply",
        "Auto-reply",
        "Autoreply",
        "Auto:",
        "Out of Office",
        "Out of the office",
        "Undeliverable",
        "Undelivered Mail",
        "Delivery Status Notification",
        "Mail delivery failed",
        "Returned mail",
        "Delivery has failed",
    ]
    automatic_senders: list[str] = [
        "mailer-daemon",
        "postmaster",
        "no-reply",
        "noreply",
        "do-not-reply",
        "donotreply",
        "bounce",
        "bounces",
        "newsletter",
        "notifications",
    ]


class NetPolicy(Strict):
    session_gap_minutes: Annotated[float, Field(gt=0)] = 5
    min_session_minutes: Annotated[float, Field(ge=0)] = 3
    min_session_bytes: Annotated[int, Field(ge=0)] = 2_000_000
    categories: list[str] = ["streaming"]


class RulesFile(Strict):
    clauses: dict[str, Clause]
    rules: list[RuleSpec]
    mail: MailPolicy = MailPolicy()
    network: NetPolicy = NetPolicy()

    @model_validator(mode="after")
    def _clauses_exist(self) -> RulesFile:
        for i, rule in enumerate(self.rules):
            for c in rule.clauses:
                if c not in self.clauses:
                    raise ValueError(f"rules[{i}] ({rule.id}) cites unknown clause {c!r}")
        ids = [r.id for r in self.rules]
        missing = set(RULE_IDS) - set(ids)
        if missing:
            raise ValueError(f"no entry for rule(s) {', '.join(sorted(missing))}")
        if len(set(ids)) != len(ids):
            raise ValueError("a rule id appears twice")
        return self


# ---- streaming.toml -------------------------------------------------------------------------


class DomainEntry(Strict):
    name: str
    source: Annotated[str, Field(min_length=2)]
    note: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _domain(v)


class RangeEntry(Strict):
    cidr: str
    source: Annotated[str, Field(min_length=2)]
    note: str = ""

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_network(v, strict=True))
        except ValueError as exc:
            raise ValueError(f"not a network: {v!r} ({exc})") from None


class ServiceEntry(Strict):
    name: str
    category: str
    enabled: bool = True
    suffixes: list[DomainEntry] = []
    hosts: list[DomainEntry] = []
    ranges: list[RangeEntry] = []


class NotViewingEntry(Strict):
    name: str
    match: Literal["suffix", "exact"] = "suffix"
    why: str
    source: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _domain(v)


class StreamingFile(Strict):
    service: list[ServiceEntry]
    not_viewing: list[NotViewingEntry] = []


class ProvidersFile(Strict):
    domains: list[DomainEntry]


# ---- the classifier -------------------------------------------------------------------------


def build_classifier(streaming: StreamingFile, enabled_categories: set[str]) -> Classifier:
    exact: dict[str, Classification] = {}
    suffix: dict[str, Classification] = {}
    networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Classification]] = []
    for svc in streaming.service:
        if not svc.enabled or svc.category not in enabled_categories:
            continue
        for d in svc.suffixes:
            suffix[d.name] = Classification(svc.name, svc.category, d.name, d.source)
        for d in svc.hosts:
            exact[d.name] = Classification(svc.name, svc.category, d.name, d.source)
        for r in svc.ranges:
            hit = Classification(svc.name, svc.category, r.cidr, r.source)
            networks.append((ipaddress.ip_network(r.cidr), hit))
    for nv in streaming.not_viewing:
        target = exact if nv.match == "exact" else suffix
        target.setdefault(nv.name, Classification(None, None, nv.name, nv.source, nv.why))
    # Most specific network first.
    networks.sort(key=lambda item: item[0].prefixlen, reverse=True)
    return Classifier(exact, suffix, tuple(networks))


@dataclass(frozen=True, slots=True)
class Policy:
    folder: Path
    rules: dict[str, RuleSpec]
    clauses: dict[str, str]
    mail: MailPolicy
    network: NetPolicy
    streaming: StreamingFile
    personal_providers: frozenset[str]

    def classifier(self, categories: set[str] | None = None) -> Classifier:
        return build_classifier(
            self.streaming, categories if categories is not None else set(self.network.categories)
        )

    def clause_text(self, rule_id: str) -> list[tuple[str, str]]:
        return [(c, self.clauses[c]) for c in self.rules[rule_id].clauses]

    def is_personal_provider(self, email: str) -> bool:
        domain = email.rpartition("@")[2].lower()
        while domain:
            if domain in self.personal_providers:
                return True
            domain = domain.partition(".")[2]
        return False


def load_policy(folder: Path | None = None) -> Policy:
    folder = folder or default_policy_dir()
    if not folder.is_dir():
        raise ConfigError("policy folder not found", where=str(folder))
    rules = load_toml(folder / "rules.toml", RulesFile)
    streaming = load_toml(folder / "streaming.toml", StreamingFile)
    providers = load_toml(folder / "personal-mail-providers.toml", ProvidersFile)
    return Policy(
        folder=folder,
        rules={r.id: r for r in rules.rules},
        clauses={k: v.text for k, v in rules.clauses.items()},
        mail=rules.mail,
        network=rules.network,
        streaming=streaming,
        personal_providers=frozenset(d.name for d in providers.domains),
    )
