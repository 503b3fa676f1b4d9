"""Accounts and what guards the console, without a browser: hashes, lock-out, the `users` command,
the proxy-header sign-in and `serve_console` stopping on its event."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from auditd.config import load_config
from auditd.console import serve_console
from auditd.console.auth import (
    LOCKOUT,
    MAX_FAILURES,
    after_failure,
    check_new_password,
    hash_password,
    is_locked,
    pseudonym,
    verify_password,
)
from auditd.store import Store
from tests.conftest import Run

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


class TestPasswords:
    """scrypt hashes with their parameters; a wrong or malformed hash never matches."""

    def test_right_password_matches_and_wrong_does_not(self) -> None:
        stored = hash_password("a long enough secret")
        assert stored.startswith("scrypt$16384$8$1$")
        assert verify_password("a long enough secret", stored)
        assert not verify_password("a long enough secreT", stored)

    def test_same_password_hashes_differently(self) -> None:
        assert hash_password("a long enough secret") != hash_password("a long enough secret")

    @pytest.mark.parametrize(
        "stored", [None, "", "plain", "scrypt$1$1$1$!!$!!", "scrypt$99999999$8$1$AA==$AA=="]
    )
    def test_missing_or_malformed_hash_never_matches(self, stored: str | None) -> None:
        assert not verify_password("anything", stored)

    def test_short_passwords_are_refused(self) -> None:
        assert check_new_password("short") is not None
        assert check_new_password("long enough now") is None


class TestLockout:
    def test_fifth_failure_locks_for_fifteen_minutes(self) -> None:
        count = 0
        for _ in range(MAX_FAILURES - 1):
            attempt = after_failure(count, NOW)
            assert attempt.locked_until is None
            count = attempt.failed_attempts
        locked = after_failure(count, NOW)
        assert locked.locked_until == NOW + LOCKOUT == NOW + timedelta(minutes=15)
        assert is_locked(locked.locked_until, NOW + timedelta(minutes=14))
        assert not is_locked(locked.locked_until, NOW + timedelta(minutes=15))


class TestPseudonyms:
    def test_stable_per_key_and_case_insensitive(self) -> None:
        key = b"k" * 32
        a = pseudonym(key, "Jane.Smith@choysez.org.uk")
        assert a == pseudonym(key, "jane.smith@choysez.org.uk")
        assert a.startswith("Staff ") and len(a) == len("Staff 3f2a")
        assert a != pseudonym(b"j" * 32, "jane.smith@choysez.org.uk")


class TestUsersCommand:
    """`users add|remove|list`, audited; a password file or the prompt; proxy-only accounts."""

    def test_add_list_remove(self, cli: Run, school: Path) -> None:
        config = school / "config.toml"
        pw = school / "pw"
        pw.write_text("a long enough secret\n")
        cli(
            "users",
            "add",
            "DSL@choysez.org.uk",
            "--role",
            "dsl",
            "--password-file",
            pw,
            "--config",
            config,
            check=True,
        )
        cli("users", "add", "ict.manager@choysez.org.uk", "--role", "ict-manager", "--no-password",
            "--config", config, check=True)  # fmt: skip
        listed = cli("users", "list", "--config", config, check=True).stdout
        assert "dsl@choysez.org.uk" in listed and "proxy only" in listed
        again = cli(
            "users",
            "add",
            "dsl@choysez.org.uk",
            "--role",
            "viewer",
            "--password-file",
            pw,
            "--config",
            config,
        )
        assert again.returncode == 2 and "already exists" in again.stderr
        cli("users", "remove", "dsl@choysez.org.uk", "--config", config, check=True)
        assert "dsl@choysez.org.uk" not in cli("users", "list", "--config", config, check=True).stdout
        with Store.open(load_config(config).store.path) as store:
            actions = [(e.action, e.target) for e in store.list_audit()]
            user = store.get_user("ict.manager@choysez.org.uk")
        assert ("user.add", "user:dsl@choysez.org.uk") in actions
        assert ("user.remove", "user:dsl@choysez.org.uk") in actions
        assert user is not None and user.password_hash is None

    def test_bad_role_short_password_and_missing_file(self, cli: Run, school: Path) -> None:
        config = school / "config.toml"
        short = school / "short"
        short.write_text("short\n")
        assert cli("users", "add", "a@choysez.org.uk", "--role", "admin", "--config", config).returncode == 2
        proc = cli(
            "users",
            "add",
            "a@choysez.org.uk",
            "--role",
            "viewer",
            "--password-file",
            short,
            "--config",
            config,
        )
        assert proc.returncode == 2 and "at least" in proc.stderr
        proc = cli("users", "add", "a@choysez.org.uk", "--role", "viewer", "--password-file", school / "nope",
                   "--config", config)  # fmt: skip
        assert proc.returncode == 2 and "nope" in proc.stderr

    def test_plain_cookies_only_on_loopback(self, cli: Run, school: Path) -> None:
        config = school / "config.toml"
        config.write_text(config.read_text() + '\n[console]\nhost = "0.0.0.0"\ncookie_secure = false\n')
        proc = cli("console", "--config", config)
        assert proc.returncode == 2 and "cookie_secure" in proc.stderr


def _get(url: str, headers: dict[str, str]) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class TestProxyHeaderAndServing:
    """Behind a reverse proxy: the header names the person, only from a trusted peer, only for an account."""

    def _serve(self, school: Path, extra: str) -> tuple[str, threading.Event, threading.Thread]:
        path = school / "config.toml"
        path.write_text(path.read_text() + extra)
        config = load_config(path)
        with Store.open(config.store.path) as store:
            store.add_user("ict.manager@choysez.org.uk", "ict-manager", None, by="test", now=NOW)
        stop = threading.Event()
        ready: list[tuple[str, int]] = []
        started = threading.Event()

        def on_ready(host: str, port: int) -> None:
            ready.append((host, port))
            started.set()

        t = threading.Thread(
            target=serve_console, args=(config, stop), kwargs={"port": 0, "on_ready": on_ready}
        )
        t.start()
        assert started.wait(10)
        return f"http://127.0.0.1:{ready[0][1]}/", stop, t

    def test_trusted_proxy_header_signs_in_and_is_audited(self, school: Path) -> None:
        url, stop, t = self._serve(school, '\n[console]\nauth = "proxy-header"\ncookie_secure = false\n')
        try:
            status, body = _get(url + "sources", {"X-Forwarded-Email": "ict.manager@choysez.org.uk"})
            assert status == 200 and "ict.manager@choysez.org.uk" in body
            status, body = _get(url + "sources", {"X-Forwarded-Email": "stranger@example.org"})
            assert status == 403 and "no account" in body
            status, _ = _get(url + "sources", {})
            assert status == 403
        finally:
            stop.set()
            t.join(10)
        assert not t.is_alive(), "serve_console did not stop on its event"
        with Store.open(load_config(school / "config.toml").store.path) as store:
            entries = [(e.action, e.actor, e.details.get("method")) for e in store.list_audit()]
        assert ("signin", "ict.manager@choysez.org.uk", "proxy-header") in entries
        assert any(a == "signin.failed" and who == "stranger@example.org" for a, who, _ in entries)

    def test_header_from_an_untrusted_peer_is_refused(self, school: Path) -> None:
        extra = '\n[console]\nauth = "proxy-header"\ntrusted_proxies = ["10.9.9.9"]\ncookie_secure = false\n'
        url, stop, t = self._serve(school, extra)
        try:
            status, body = _get(url + "findings", {"X-Forwarded-Email": "ict.manager@choysez.org.uk"})
            assert status == 403 and "only through its reverse proxy" in body
        finally:
            stop.set()
            t.join(10)
