"""Configuration: TOML validated into frozen models, with one-line errors naming file and key.

Relative paths resolve against the config file's folder; `*_file` secrets resolve in
`$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`) when it is set.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import re
from datetime import date, time
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationInfo, field_validator, model_validator

from auditd.errors import ConfigError
from auditd.locations import DEFAULT_CONFIG as DEFAULT_CONFIG
from auditd.locations import ENV_CONFIG as ENV_CONFIG
from auditd.locations import config_path as config_path
from auditd.tomlmodel import Strict

DEFAULT_STORE = Path("/var/lib/choysez-auditd/auditd.db")

EMAIL_RE = re.compile(r"^[^@\s<>(),;:\"\[\]]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+$")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def check_email(value: str) -> str:
    v = value.strip()
    if not EMAIL_RE.match(v):
        raise ValueError(f"not an e-mail address: {value!r}")
    return v.lower()


def _clock(value: str) -> time:
    try:
        hh, mm = value.split(":")
        if len(hh) != 2 or len(mm) != 2:
            raise ValueError
        return time(int(hh), int(mm))
    except ValueError:
        raise ValueError(f"not a time of day as HH:MM: {value!r}") from None


def _resolve(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base")
    if base is not None and not path.is_absolute():
        return Path(base) / path
    return path


Email = Annotated[str, Field(min_length=3)]


class Organisation(Strict):
    name: str
    official_domains: Annotated[list[str], Field(min_length=1)]
    timezone: str = "Europe/London"
    site: str | None = None

    @field_validator("official_domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        out = []
        for d in v:
            d = d.strip().lower().lstrip("@")
            if "." not in d or " " in d or "@" in d:
                raise ValueError(f"not a domain name: {d!r}")
            out.append(d)
        return out

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (use an IANA name like Europe/London)") from None
        return v

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def is_official(self, email: str) -> bool:
        domain = email.rpartition("@")[2].lower()
        return any(domain == d or domain.endswith("." + d) for d in self.official_domains)


class People(Strict):
    ict_manager: Email
    centre_manager: Email
    deputies: list[Email] = []
    dsl: Email

    @field_validator("ict_manager", "centre_manager", "dsl")
    @classmethod
    def _one(cls, v: str) -> str:
        return check_email(v)

    @field_validator("deputies")
    @classmethod
    def _many(cls, v: list[str]) -> list[str]:
        return [check_email(x) for x in v]

    def may_approve(self, email: str) -> bool:
        who = email.strip().lower()
        return who == self.centre_manager or who in self.deputies

    def may_review(self, email: str) -> bool:
        who = email.strip().lower()
        return who in (self.ict_manager, self.dsl)


class Directory(Strict):
    staff: Path
    community: Path | None = None

    @field_validator("staff", "community")
    @classmethod
    def _paths(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return None if v is None else _resolve(v, info)


class StoreConfig(Strict):
    path: Path = DEFAULT_STORE
    retention_days: Annotated[int, Field(ge=1)] = 90
    audit_retention_days: Annotated[int, Field(ge=1)] = 730  # the audit log outlives the findings
    url: Annotated[str, Field(pattern=r"^postgres(ql)?://")] | None = None  # PostgreSQL instead of `path`
    password_file: Path | None = None  # the PostgreSQL password, kept out of the config file

    @field_validator("path", "password_file")
    @classmethod
    def _path(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return None if v is None else _resolve(v, info)


class PolicyConfig(Strict):
    dir: Path | None = None

    @field_validator("dir")
    @classmethod
    def _dir(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return None if v is None else _resolve(v, info)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Source(Strict):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    interval_minutes: Annotated[int, Field(ge=1)] = 15
    enabled: bool = True


class ImapSource(_Source):
    type: Literal["imap"]
    host: str
    port: Annotated[int, Field(ge=1, le=65535)] = 993
    tls: bool = True
    username: str  # for XOAUTH2 with Microsoft 365 or Google Workspace: the mailbox address
    password_file: Path | None = None
    oauth_token_file: Path | None = None  # a bearer token kept fresh by something else (XOAUTH2)
    # or the OAuth client-credentials flow (Microsoft 365 app-only): a token fetched per connection
    oauth_client_id: str | None = None
    oauth_tenant_id: str | None = None
    oauth_client_secret_file: Path | None = None
    oauth_certificate_file: Path | None = None  # PEM holding the certificate and its private key
    oauth_authority: str = "https://login.microsoftonline.com/{tenant_id}"
    oauth_scope: str = "https://outlook.office365.com/.default"
    oauth_ca_file: Path | None = None  # PEM bundle to trust for the authority (an inspecting proxy)
    folders: list[str] = ["INBOX"]

    @field_validator("oauth_ca_file")
    @classmethod
    def _ca(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return None if v is None else _resolve(v, info)

    @model_validator(mode="after")
    def _plain_only_loopback(self) -> ImapSource:
        if not self.tls and not _is_loopback(self.host):
            raise ValueError(f"tls = false is only allowed for a loopback host, not {self.host!r}")
        ways = [k for k in ("password_file", "oauth_token_file", "oauth_client_id") if getattr(self, k)]
        if not ways:
            raise ValueError(
                "set one way to log in: password_file, oauth_token_file, or oauth_client_id "
                "(with oauth_client_secret_file or oauth_certificate_file)"
            )
        if len(ways) > 1:
            raise ValueError(f"set only one way to log in, not {' and '.join(ways)}")
        flow_keys = ("oauth_tenant_id", "oauth_client_secret_file", "oauth_certificate_file", "oauth_ca_file")
        if self.oauth_client_id is None:
            stray = [k for k in flow_keys if getattr(self, k) is not None]
            if stray:
                raise ValueError(f"{stray[0]} is for the client-credentials flow: set oauth_client_id too")
            return self
        if (self.oauth_client_secret_file is None) == (self.oauth_certificate_file is None):
            raise ValueError(
                "with oauth_client_id, set exactly one of oauth_client_secret_file and oauth_certificate_file"
            )
        if "{tenant_id}" in self.oauth_authority and not self.oauth_tenant_id:
            raise ValueError("oauth_client_id needs oauth_tenant_id (the directory the app is registered in)")
        if not self.oauth_authority.lower().startswith("https://"):
            raise ValueError("oauth_authority must be an https:// URL")
        return self

    @property
    def oauth_authority_url(self) -> str:
        return self.oauth_authority.replace("{tenant_id}", self.oauth_tenant_id or "").rstrip("/")


class EwsSource(_Source):
    type: Literal["ews"]
    server: str  # a host name (https://HOST/EWS/Exchange.asmx), or the full EWS URL
    username: str
    password_file: Path
    mailboxes: Annotated[list[Email], Field(min_length=1)]
    impersonation: bool = True
    folders: list[str] = ["inbox", "sent"]
    auth: Literal["ntlm", "basic"] = "ntlm"
    ca_file: Path | None = None  # PEM bundle to trust instead of the system's (a private CA)
    max_wait_seconds: Annotated[int, Field(ge=0, le=3600)] = 300  # longest throttling back-off honoured

    @field_validator("ca_file")
    @classmethod
    def _ca(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return None if v is None else _resolve(v, info)

    @model_validator(mode="after")
    def _plain_only_loopback(self) -> EwsSource:
        if self.server.lower().startswith("http://"):
            host = (self.server[7:].split("/", 1)[0].rsplit(":", 1)[0]).strip("[]")
            if not _is_loopback(host):
                raise ValueError(f"plain http:// is only allowed for a loopback host, not {host!r}")
        return self

    @property
    def endpoint(self) -> str:
        s = self.server.rstrip("/")
        return s if s.lower().startswith(("http://", "https://")) else f"https://{s}/EWS/Exchange.asmx"


class GraphSource(_Source):
    type: Literal["graph"]
    tenant_id: str
    client_id: str
    client_secret_file: Path | None = None
    certificate_file: Path | None = None  # PEM holding the certificate and its private key
    mailboxes: Annotated[list[Email], Field(min_length=1)]
    folders: list[str] = ["inbox", "sentitems"]
    graph_url: str = "https://graph.microsoft.com/v1.0"  # sovereign clouds: https://graph.microsoft.us/v1.0
    authority: str = "https://login.microsoftonline.com/{tenant_id}"
    ca_file: Path | None = None  # PEM bundle to trust instead of the system's (an inspecting proxy)
    max_wait_seconds: Annotated[int, Field(ge=0, le=3600)] = 300  # longest Retry-After honoured

    @field_validator("ca_file")
    @classmethod
    def _ca(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return None if v is None else _resolve(v, info)

    @model_validator(mode="after")
    def _one_credential(self) -> GraphSource:
        if (self.client_secret_file is None) == (self.certificate_file is None):
            raise ValueError("set exactly one of client_secret_file and certificate_file")
        for key in ("graph_url", "authority"):
            if not getattr(self, key).lower().startswith("https://"):
                raise ValueError(f"{key} must be an https:// URL")
        return self

    @property
    def authority_url(self) -> str:
        return self.authority.replace("{tenant_id}", self.tenant_id).rstrip("/")


class FileMailSource(_Source):
    type: Literal["maildir", "mbox", "eml"]
    path: Path

    @field_validator("path")
    @classmethod
    def _path(cls, v: Path, info: ValidationInfo) -> Path:
        return _resolve(v, info)


MailSourceConfig = Annotated[
    ImapSource | EwsSource | GraphSource | FileMailSource, Field(discriminator="type")
]


class FileNetSource(_Source):
    type: Literal["pcap", "zeek", "suricata", "squid", "dnsmasq", "bind"]
    path: str  # a file, a folder or a glob; relative to the config file's folder

    def resolved(self, base: Path) -> str:
        p = Path(self.path)
        return str(p if p.is_absolute() else base / p)


class LiveNetSource(_Source):
    """A live interface: `choysez-auditd capture` writes rotated pcaps to `spool`; scans read them."""

    type: Literal["live"]
    interface: Annotated[str, Field(min_length=1)]
    bpf: str = "udp port 53 or tcp port 80 or tcp port 443 or udp port 443"
    spool: Path | None = None  # default: spool/NAME beside the store
    rotate_minutes: Annotated[int, Field(ge=1, le=1440)] = 5
    snaplen: Annotated[int, Field(ge=128, le=65535)] = 512

    @field_validator("spool")
    @classmethod
    def _spool(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return None if v is None else _resolve(v, info)


NetSourceConfig = Annotated[FileNetSource | LiveNetSource, Field(discriminator="type")]


class Room(Strict):
    name: Annotated[str, Field(min_length=1)]
    subnets: Annotated[list[str], Field(min_length=1)]

    @field_validator("subnets")
    @classmethod
    def _subnets(cls, v: list[str]) -> list[str]:
        out = []
        for s in v:
            try:
                out.append(str(ipaddress.ip_network(s, strict=True)))
            except ValueError as exc:
                raise ValueError(f"bad subnet {s!r}: {exc}") from None
        return out

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(s) for s in self.subnets]


class Period(Strict):
    name: str
    start: time
    end: time

    @field_validator("start", "end", mode="before")
    @classmethod
    def _clock(cls, v: object) -> object:
        return _clock(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _order(self) -> Period:
        if self.start >= self.end:
            raise ValueError(f"period {self.name!r} ends before it starts")
        return self


class Term(Strict):
    start: date
    end: date

    @model_validator(mode="after")
    def _order(self) -> Term:
        if self.start > self.end:
            raise ValueError("term ends before it starts")
        return self


class Timetable(Strict):
    weekdays: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = [
        "mon",
        "tue",
        "wed",
        "thu",
        "fri",
    ]
    periods: list[Period] = []
    terms: list[Term] = []

    def weekday_numbers(self) -> frozenset[int]:
        return frozenset(WEEKDAYS.index(d) for d in self.weekdays)


class Mail(Strict):
    sources: list[MailSourceConfig] = []
    business_threshold: Annotated[int, Field(ge=1)] | None = None


class Network(Strict):
    sources: list[NetSourceConfig] = []
    rooms: list[Room] = []
    categories: list[str] | None = None
    session_gap_minutes: Annotated[float, Field(gt=0)] | None = None
    min_session_minutes: Annotated[float, Field(ge=0)] | None = None
    min_session_bytes: Annotated[int, Field(ge=0)] | None = None
    devices: Path | None = None  # optional CSV: device,staff (an IP or MAC, and who uses it)

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return None if v is None else _resolve(v, info)


class Digest(Strict):
    time: str = "07:00"
    smtp_host: str = "localhost"
    smtp_port: Annotated[int, Field(ge=1, le=65535)] = 25
    starttls: bool | None = None  # default: on unless the host is loopback
    username: str | None = None
    password_file: Path | None = None
    sender: Email = Field("choysez-auditd@localhost", alias="from")
    max_items_per_section: Annotated[int, Field(ge=1)] = 25
    ca_file: Path | None = None  # PEM bundle to trust for STARTTLS instead of the system's (a private CA)
    retry_seconds: Annotated[int, Field(ge=1)] = 60  # first retry after a failed send; doubles up to 30 min

    @field_validator("ca_file")
    @classmethod
    def _ca(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return None if v is None else _resolve(v, info)

    @field_validator("time")
    @classmethod
    def _time(cls, v: str) -> str:
        _clock(v)
        return v

    @field_validator("sender")
    @classmethod
    def _sender(cls, v: str) -> str:
        return check_email(v)

    @property
    def at(self) -> _dt.time:
        return _clock(self.time)


class Console(Strict):
    """The review console (`choysez-auditd console`; `run` serves it too when this section is present)."""

    host: str = "127.0.0.1"  # loopback: a reverse proxy in front terminates TLS
    port: Annotated[int, Field(ge=0, le=65535)] = 8765
    auth: Literal["local", "proxy-header"] = "local"
    proxy_header: Annotated[str, Field(pattern=r"^[A-Za-z0-9-]+$")] = "X-Forwarded-Email"
    trusted_proxies: list[str] = ["127.0.0.1", "::1"]  # only these peers may set proxy_header
    session_minutes: Annotated[int, Field(ge=1, le=24 * 60)] = 60  # idle time before signing in again
    cookie_secure: bool = True  # false only for plain-HTTP testing on a loopback host

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: list[str]) -> list[str]:
        out = []
        for s in v:
            try:
                out.append(str(ipaddress.ip_network(s, strict=False)))
            except ValueError:
                raise ValueError(f"not an IP address or network: {s!r}") from None
        return out

    @model_validator(mode="after")
    def _plain_only_loopback(self) -> Console:
        if not self.cookie_secure and not _is_loopback(self.host):
            raise ValueError(f"cookie_secure = false is only allowed for a loopback host, not {self.host!r}")
        return self

    def is_trusted_proxy(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(n) for n in self.trusted_proxies)


class Config(Strict):
    organisation: Organisation
    people: People
    directory: Directory
    store: StoreConfig = StoreConfig()
    policy: PolicyConfig = PolicyConfig()
    mail: Mail = Mail()
    network: Network = Network()
    timetable: Timetable = Timetable()
    digest: Digest = Digest()
    console: Console | None = None
    path: Path = Path("config.toml")

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        names = [s.name for s in self.mail.sources] + [s.name for s in self.network.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source name used twice: {', '.join(dupes)}")
        rooms = [r.name for r in self.network.rooms]
        if len(set(rooms)) != len(rooms):
            raise ValueError("a room name is used twice")
        return self

    @property
    def base(self) -> Path:
        return self.path.parent


def secret_path(name: Path, config_dir: Path) -> Path:
    """Where a `*_file` secret lives: under $CREDENTIALS_DIRECTORY when set, else by the config."""
    if name.is_absolute():
        return name
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(creds) / name if creds else config_dir / name


def read_secret(name: Path, config_dir: Path, key: str) -> str:
    path = secret_path(name, config_dir)
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secret for {key}: {exc.strerror}", where=str(path)) from None


def load_config(path: Path) -> Config:
    """Read and validate a config file. Directory files are checked separately (`load_directory`)."""
    path = path.absolute()
    from auditd.tomlmodel import read_toml, validate

    data = read_toml(path)
    if isinstance(data, dict):
        if "path" in data:
            raise ConfigError("key 'path': unknown key", where=str(path))
        data = {**data, "path": path}
    return validate(Config, data, str(path), context={"base": path.parent})
