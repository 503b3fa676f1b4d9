"""A real Dovecot for the IMAP tests: one server per session, an empty mailbox per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.mail.dovecot import Dovecot, available


@pytest.fixture(scope="session")
def dovecot_server() -> Iterator[Dovecot]:
    if not available():
        pytest.skip("Dovecot is not installed (/usr/sbin/dovecot; Debian package dovecot-imapd)")
    server = Dovecot().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dovecot(dovecot_server: Dovecot) -> Dovecot:
    """The session's Dovecot with an empty mailbox: only INBOX, no messages."""
    dovecot_server.reset_mailbox()
    return dovecot_server


@pytest.fixture
def lone_dovecot() -> Iterator[Dovecot]:
    """A Dovecot of the test's own, for a failed login: Dovecot then makes every login from the same
    address wait a few seconds (its auth penalty), which must not slow the tests that follow."""
    if not available():
        pytest.skip("Dovecot is not installed (/usr/sbin/dovecot; Debian package dovecot-imapd)")
    server = Dovecot().start()
    try:
        yield server
    finally:
        server.stop(fast=True)
