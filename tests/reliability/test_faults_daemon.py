"""Faults around the daemon's digest: killed while sending, the mail still goes out once, on restart."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from tests.conftest import COMMAND
from tests.test_digest_send import free_port, set_digest

ICT = "ict.manager@choysez.org.uk"
DSL = "dsl@choysez.org.uk"


@dataclass
class StallingInbox:
    """An SMTP server that holds the first message it is given, then keeps every later one."""

    stall_seconds: float
    stalled: asyncio.Event | None = None
    received: list[tuple[list[str], bytes]] = field(default_factory=list)
    attempts: int = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.attempts += 1
        if self.attempts == 1:
            await asyncio.sleep(self.stall_seconds)  # the daemon is killed while it waits for the answer
            return "451 4.3.0 try again later"
        self.received.append((list(envelope.rcpt_tos), envelope.original_content))
        return "250 OK"

    def per_recipient(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rcpts, _ in self.received:
            for r in rcpts:
                out[r] = out.get(r, 0) + 1
        return out


def start(config: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    return subprocess.Popen(
        [str(COMMAND), "run", "--config", str(config), "--digest-now"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(what: Any, timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {why}")


def digest_rows(db: Path) -> list[tuple[str, str, int]]:
    conn = sqlite3.connect(db)
    try:
        return [(r, s, a) for r, s, a in conn.execute("SELECT recipient, status, attempts FROM digests")]
    finally:
        conn.close()


class TestKilledDuringDigest:
    """SIGKILL while the SMTP server holds the first digest: after a restart each person gets it once."""

    def test_digest_is_sent_once_after_sigkill_mid_send(self, school: Path) -> None:
        inbox = StallingInbox(stall_seconds=20)
        port = free_port()
        controller = Controller(inbox, hostname="127.0.0.1", port=port)
        controller.start()
        try:
            config = school / "config.toml"
            set_digest(config, smtp_host="127.0.0.1", smtp_port=port, retry_seconds=1)
            first = start(config)
            try:
                wait_for(lambda: inbox.attempts >= 1, 30, "the first digest to reach the server")
                first.send_signal(signal.SIGKILL)  # no chance to record anything
                first.wait(timeout=10)
            finally:
                if first.poll() is None:
                    first.kill()
            assert inbox.received == []
            second = start(config)
            try:
                wait_for(lambda: set(inbox.per_recipient()) >= {ICT, DSL}, 60, "both digests after restart")
                time.sleep(1.5)  # a retry tick: nothing more may be sent
                second.send_signal(signal.SIGTERM)
                assert second.wait(timeout=15) == 0
            finally:
                if second.poll() is None:
                    second.kill()
        finally:
            controller.stop()
        assert inbox.per_recipient() == {ICT: 1, DSL: 1}
        rows = digest_rows(school / "auditd.db")
        assert {(r, s) for r, s, _ in rows} == {(ICT, "sent"), (DSL, "sent")}
