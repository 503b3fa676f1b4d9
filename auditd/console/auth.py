"""Sign-in for the review console: password hashes, roles, session and CSRF tokens, pseudonyms.

Pure functions (no store, no web framework), so the rules that guard the console are tested on
their own. Passwords are hashed with scrypt (stdlib, memory-hard); tokens come from `secrets`;
every comparison of a secret is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from auditd.model import StoredFinding

# scrypt cost: 16 MiB of memory and ~50 ms a guess on a small server (OWASP's minimum for scrypt).
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
MIN_PASSWORD = 10

MAX_FAILURES = 5
LOCKOUT = timedelta(minutes=15)


class Role(StrEnum):
    ICT_MANAGER = "ict-manager"
    CENTRE_MANAGER = "centre-manager"
    DSL = "dsl"
    VIEWER = "viewer"


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$salt$hash`, both base64: the parameters travel with the hash, so they can rise."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return "$".join(("scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(digest)))


def verify_password(password: str, stored: str | None) -> bool:
    """Whether `password` matches `stored`; a missing or malformed hash never matches.

    An unknown account is checked against a dummy hash, so the time taken does not tell
    whether the account exists.
    """
    parts = (stored or _DUMMY_HASH).split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return False
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, expected = _unb64(parts[4]), _unb64(parts[5])
        if not (2 <= n <= 2**20 and 1 <= r <= 32 and 1 <= p <= 16):
            return False
        got = hashlib.scrypt(
            password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=len(expected), maxmem=2**27
        )
    except ValueError:
        return False
    return hmac.compare_digest(got, expected) and stored is not None


def check_new_password(password: str) -> str | None:
    """Why a new password is refused, or None when it is acceptable."""
    if len(password) < MIN_PASSWORD:
        return f"a password needs at least {MIN_PASSWORD} characters"
    if password.strip() != password:
        return "a password may not start or end with spaces"
    return None


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ValueError("bad base64") from None


_DUMMY_HASH = hash_password("not a password of anyone's", salt=b"\0" * SALT_BYTES)


# ---- lock-out ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """What a failed sign-in does to an account: its new failure count and lock."""

    failed_attempts: int
    locked_until: datetime | None


def after_failure(failed_attempts: int, now: datetime) -> Attempt:
    """The MAX_FAILURES-th failure in a row locks the account for LOCKOUT, then the count restarts."""
    count = failed_attempts + 1
    if count >= MAX_FAILURES:
        return Attempt(0, now + LOCKOUT)
    return Attempt(count, None)


def is_locked(locked_until: datetime | None, now: datetime) -> bool:
    return locked_until is not None and now < locked_until


# ---- tokens -----------------------------------------------------------------------------------


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_id(token: str) -> str:
    """What the store keeps of a session token: its hash, so a copy of the store signs no one in."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def same_token(given: str | None, expected: str | None) -> bool:
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def signin_csrf(key: bytes, pre_session: str) -> str:
    """The sign-in form's CSRF token, bound to the pre-session cookie (there is no session yet)."""
    return hmac.new(key, b"signin:" + pre_session.encode("utf-8"), hashlib.sha256).hexdigest()


# ---- pseudonyms -------------------------------------------------------------------------------


def pseudonym(key: bytes, email: str) -> str:
    """`Staff 3f2a`: a short keyed hash of an address, stable for one store, meaningless outside it."""
    digest = hmac.new(key, email.strip().lower().encode("utf-8"), hashlib.sha256).hexdigest()
    return f"Staff {digest[:4]}"


# ---- what each role may do ----------------------------------------------------------------------


@dataclass(frozen=True)
class Permissions:
    """What one signed-in person may see and do.

    `may_review` and `may_approve` also need the person to be the configured ICT manager or DSL,
    or the centre manager or a deputy (the same rule as the CLI), so a role alone grants no power
    the configuration does not.
    """

    role: Role
    may_review_person: bool
    may_approve_person: bool

    @property
    def sees_all_findings(self) -> bool:
        return self.role != Role.DSL

    def may_see(self, f: StoredFinding) -> bool:
        return self.sees_all_findings or f.pupil_involved

    @property
    def reveals_names(self) -> bool:
        """On a finding's page; lists are always pseudonymised."""
        return self.role != Role.VIEWER

    def may_review(self, f: StoredFinding) -> bool:
        return self.role in (Role.ICT_MANAGER, Role.DSL) and self.may_review_person and self.may_see(f)

    @property
    def may_view_approvals(self) -> bool:
        return self.role != Role.DSL

    @property
    def may_approve(self) -> bool:
        return self.role == Role.CENTRE_MANAGER and self.may_approve_person

    @property
    def may_view_digests(self) -> bool:
        """The digest names everyone, pupils' matters and not: managers only."""
        return self.role in (Role.ICT_MANAGER, Role.CENTRE_MANAGER)

    @property
    def may_view_audit(self) -> bool:
        return self.role in (Role.ICT_MANAGER, Role.CENTRE_MANAGER)
