"""Who is staff and who is community: `staff.csv` and `community.csv`, validated line by line."""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from auditd.config import Config, check_email
from auditd.errors import ConfigError

STAFF_HEADER = ("name", "email", "role", "personal_emails")
COMMUNITY_HEADER = ("name", "email", "relationship", "pupil")
RELATIONSHIPS = ("pupil", "parent", "carer")
_TITLES = frozenset({"mr", "mrs", "ms", "miss", "mx", "dr", "prof", "sir", "rev"})


def name_key(name: str) -> str:
    """A person's name for comparison: accents, case, punctuation and titles ignored.

    "Smith, Jane" (Outlook's directory order) and "Mrs Jane Smith" both give "jane smith".
    """
    name = re.sub(r"\([^)]*\)|\[[^\]]*\]", " ", name)
    if "," in name:
        last, _, first = name.partition(",")
        name = f"{first} {last}"
    plain = unicodedata.normalize("NFKD", name)
    plain = "".join(c for c in plain if not unicodedata.combining(c)).casefold()
    words = re.sub(r"[^\w\s'-]|[\d_]", " ", plain).replace("'", "").replace("-", " ").split()
    while words and words[0].rstrip(".") in _TITLES:
        words = words[1:]
    return " ".join(words)


@dataclass(frozen=True, slots=True)
class StaffMember:
    name: str
    email: str
    role: str
    personal_emails: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CommunityMember:
    name: str
    email: str | None
    relationship: str  # pupil | parent | carer
    pupil: str | None  # for a parent or carer: the pupil's name


@dataclass(frozen=True, slots=True)
class People:
    """The directory as lookups; pure data, built once per run."""

    staff: tuple[StaffMember, ...] = ()
    community: tuple[CommunityMember, ...] = ()
    by_official: dict[str, StaffMember] = field(default_factory=dict)
    by_personal: dict[str, StaffMember] = field(default_factory=dict)
    community_by_email: dict[str, CommunityMember] = field(default_factory=dict)
    staff_by_name: dict[str, tuple[StaffMember, ...]] = field(default_factory=dict)
    community_by_name: dict[str, tuple[CommunityMember, ...]] = field(default_factory=dict)

    @classmethod
    def build(cls, staff: list[StaffMember], community: list[CommunityMember]) -> People:
        staff_names: dict[str, tuple[StaffMember, ...]] = {}
        for s in staff:
            staff_names[name_key(s.name)] = (*staff_names.get(name_key(s.name), ()), s)
        community_names: dict[str, tuple[CommunityMember, ...]] = {}
        for c in community:
            community_names[name_key(c.name)] = (*community_names.get(name_key(c.name), ()), c)
        return cls(
            staff=tuple(staff),
            community=tuple(community),
            by_official={s.email: s for s in staff},
            by_personal={p: s for s in staff for p in s.personal_emails},
            community_by_email={c.email: c for c in community if c.email},
            staff_by_name=staff_names,
            community_by_name=community_names,
        )

    @property
    def pupil_names(self) -> tuple[str, ...]:
        names = {c.name for c in self.community if c.relationship == "pupil"}
        names |= {c.pupil for c in self.community if c.pupil}
        return tuple(sorted(names))


def _rows(path: Path, header: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError("file not found", where=str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", where=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", where=str(path)) from None
    reader = csv.reader(io.StringIO(text))
    first = next(reader, None)
    if first is None or tuple(h.strip().lower() for h in first) != header:
        raise ConfigError(f"line 1: header must be {','.join(header)}", where=str(path))
    for row in reader:
        line = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise ConfigError(
                f"line {line}: expected {len(header)} fields, found {len(row)}", where=str(path)
            )
        yield line, {h: c.strip() for h, c in zip(header, row, strict=True)}


def _email_at(path: Path, line: int, column: str, value: str) -> str:
    try:
        return check_email(value)
    except ValueError as exc:
        raise ConfigError(f"line {line}: {column}: {exc}", where=str(path)) from None


def load_staff(path: Path, is_official: Callable[[str], bool]) -> list[StaffMember]:
    staff: list[StaffMember] = []
    seen: dict[str, int] = {}
    for line, row in _rows(path, STAFF_HEADER):
        if not row["name"]:
            raise ConfigError(f"line {line}: name is empty", where=str(path))
        email = _email_at(path, line, "email", row["email"])
        if not is_official(email):
            raise ConfigError(f"line {line}: email {email} is not in an official domain", where=str(path))
        personal = tuple(
            _email_at(path, line, "personal_emails", p)
            for p in re.split(r"[;\s]+", row["personal_emails"])
            if p
        )
        for addr in (email, *personal):
            if addr in seen:
                raise ConfigError(
                    f"line {line}: {addr} already appears on line {seen[addr]}", where=str(path)
                )
            seen[addr] = line
        for p in personal:
            if is_official(p):
                raise ConfigError(
                    f"line {line}: personal address {p} is in an official domain", where=str(path)
                )
        staff.append(StaffMember(row["name"], email, row["role"], personal))
    return staff


def load_community(path: Path) -> list[CommunityMember]:
    members: list[CommunityMember] = []
    for line, row in _rows(path, COMMUNITY_HEADER):
        if not row["name"]:
            raise ConfigError(f"line {line}: name is empty", where=str(path))
        rel = row["relationship"].lower()
        if rel not in RELATIONSHIPS:
            raise ConfigError(
                f"line {line}: relationship must be one of {', '.join(RELATIONSHIPS)}, not {rel!r}",
                where=str(path),
            )
        email = _email_at(path, line, "email", row["email"]) if row["email"] else None
        if rel != "pupil" and not row["pupil"]:
            raise ConfigError(f"line {line}: a {rel} needs the pupil's name", where=str(path))
        if rel != "pupil" and email is None:
            raise ConfigError(f"line {line}: a {rel} needs an e-mail address", where=str(path))
        members.append(CommunityMember(row["name"], email, rel, row["pupil"] or None))
    return members


def load_directory(config: Config) -> People:
    for key, path in (("staff", config.directory.staff), ("community", config.directory.community)):
        if path is not None and not path.is_file():
            raise ConfigError(f"key 'directory.{key}': file not found: {path}", where=str(config.path))
    staff = load_staff(config.directory.staff, config.organisation.is_official)
    community = load_community(config.directory.community) if config.directory.community else []
    staff_addresses = {a for s in staff for a in (s.email, *s.personal_emails)}
    for c in community:
        if c.email and c.email in staff_addresses:
            raise ConfigError(
                f"{c.email} is listed both as staff and as community",
                where=str(config.directory.community),
            )
    return People.build(staff, community)


DEVICES_HEADER = ("device", "staff")


def load_devices(path: Path) -> dict[str, str]:
    """Optional map of device (IP or MAC address) to the staff member who uses it."""
    devices: dict[str, str] = {}
    for line, row in _rows(path, DEVICES_HEADER):
        if not row["device"]:
            raise ConfigError(f"line {line}: device is empty", where=str(path))
        devices[row["device"].lower()] = _email_at(path, line, "staff", row["staff"])
    return devices
