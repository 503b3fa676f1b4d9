"""`choysez-auditd run`, the daemon: the installed command as a subprocess, a real SMTP server on
loopback and a fake `$NOTIFY_SOCKET` (a datagram socket bound in the test's folder), as systemd
would run it. Also the retention purge, through the daemon's job and through `purge`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import pytest

from auditd.config import load_config
from auditd.daemon import Daemon, load_all, sd_notify, watchdog_interval
from auditd.store import Store
from tests.conftest import COMMAND, Run
from tests.test_digest_send import DSL, ICT, Inbox, bodies, serve_smtp, set_digest

NEW_MAIL = (
    "From: Sam Okafor <sam.okafor@icloud.com>\r\n"
    "To: Sarah Brown <sarah.brown@example.org>\r\n"
    "Subject: Oliver's consent form for the Choysez trip\r\n"
    "Date: Tue, 24 Nov 2026 19:05:00 +0000\r\n"
    "Message-ID: <daemon.new.1@icloud.com>\r\n"
    "\r\n"
    "Dear Mrs Brown, please sign Oliver Brown's consent form for the Choysez trip and\r\n"
    "bring it to parents' evening. Homework is on the portal. Sam Okafor\r\n"
)


class Notify:
    """A fake systemd: a datagram socket that collects what the daemon tells it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                return self.messages

    def seen(self, line: str) -> bool:
        return any(line in m.splitlines() for m in self.drain())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    yield from serve_smtp()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[Notify]:
    n = Notify(tmp_path / "notify.sock")
    yield n
    n.close()


def start(
    config: Path, notify: Notify | None, *args: str, out: IO[str] | None = None
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    if notify is not None:
        env |= {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
    return subprocess.Popen(
        [str(COMMAND), "run", "--config", str(config), *args],
        stdout=out or subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(what: Callable[[], bool], timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {why}")


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TestRun:
    """The daemon end to end, as systemd runs it."""

    def test_scans_sends_one_digest_each_and_stops_cleanly(
        self, school: Path, smtp: tuple[Inbox, int], notify: Notify, cli: Run, tmp_path: Path
    ) -> None:
        inbox, port = smtp
        config = school / "config.toml"
        set_digest(config, smtp_host="127.0.0.1", smtp_port=port, retry_seconds=1)
        (school / "mail" / "new").mkdir(exist_ok=True)
        (school / "mail" / "new" / "1764011100.M1P1.daemon").write_text(NEW_MAIL)
        log = tmp_path / "daemon.log"
        with log.open("w") as out:
            proc = start(config, notify, "--digest-now", out=out)
            try:
                wait_for(lambda: notify.seen("READY=1"), 15, "READY=1")
                wait_for(lambda: len(inbox.received) >= 2, 20, "two digests")
                wait_for(lambda: notify.seen("WATCHDOG=1"), 5, "WATCHDOG=1")

                second = start(config, None)  # the same store: refused
                _, err = second.communicate(timeout=15)
                assert second.returncode == 1
                assert f"another choysez-auditd run is using {school / 'auditd.db'} (pid {proc.pid})" in err

                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=10) == 0
                assert time.monotonic() - t0 < 10
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert notify.seen("STOPPING=1")
        time.sleep(0.3)
        got = inbox.messages()  # exactly one each
        assert set(got) == {ICT, DSL}
        ict_text, ict_html = bodies(got[ICT])
        dsl_text, _ = bodies(got[DSL])
        assert "Oliver's consent form" in ict_text and "sam.okafor@choysez.org.uk" in ict_text
        assert "NET-STREAMING-IN-CLASS" in ict_text and "Room 12" in ict_html
        assert "Oliver's consent form" in dsl_text
        assert "NET-STREAMING-IN-CLASS" not in dsl_text and "Netflix" not in dsl_text

        found = json.loads(cli("findings", "--config", config, "--format", "json", check=True).stdout)
        subjects = [e.get("subject") for f in found for e in f["evidence"]]
        assert "Oliver's consent form for the Choysez trip" in subjects
        assert {f["rule"] for f in found} >= {"MAIL-PERSONAL-SENDER", "NET-STREAMING-IN-CLASS"}

        lines = log_lines(log)
        scans = [x for x in lines if x.get("event") == "scan finished"]
        assert {x["source"] for x in scans} == {"sample-maildir", "sample-captures"}
        assert all(x["job"] == "scan" and len(x["run_id"]) == 12 for x in scans)
        assert [x["recipient"] for x in lines if x.get("event") == "digest sent"] == [ICT, DSL]
        assert lines[-1]["event"] == "stopped"

    def test_serves_the_console_when_configured(self, school: Path, notify: Notify, tmp_path: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = school / "config.toml"
        config.write_text(config.read_text() + f"\n[console]\nport = {port}\ncookie_secure = false\n")
        log = tmp_path / "daemon.log"
        with log.open("w") as out:
            proc = start(config, notify, out=out)
            try:
                wait_for(lambda: notify.seen("READY=1"), 15, "READY=1")
                wait_for(
                    lambda: any(x.get("event") == "console listening" for x in log_lines(log)), 15, "console"
                )
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/signin", timeout=10) as page:
                    assert page.status == 200
                    assert "sign in" in page.read().decode().lower()
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=10) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()

    def test_sighup_with_a_bad_config_keeps_the_old_one(
        self, school: Path, notify: Notify, tmp_path: Path
    ) -> None:
        config = school / "config.toml"
        log = tmp_path / "daemon.log"
        with log.open("w") as out:
            proc = start(config, notify, out=out)
            try:
                wait_for(lambda: notify.seen("READY=1"), 15, "READY=1")
                good = config.read_text()
                config.write_text(good.replace("retention_days = 90", "retention_dayz = 90"))
                proc.send_signal(signal.SIGHUP)
                wait_for(lambda: "reload rejected" in log.read_text(), 10, "the rejection")
                assert proc.poll() is None
                config.write_text(good.replace("interval_minutes = 10", "interval_minutes = 11"))
                proc.send_signal(signal.SIGHUP)
                wait_for(lambda: "config reloaded" in log.read_text(), 10, "the reload")
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=10) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
        rejected = next(x for x in log_lines(log) if x.get("event", "").startswith("reload rejected"))
        assert "retention_dayz" in rejected["error"]
        assert notify.seen("RELOADING=1")

    def test_killed_mid_scan_resumes_with_the_same_findings(self, school: Path, cli: Run) -> None:
        """SIGKILL during a scan: on restart, none lost, none doubled (compared with one clean scan)."""
        many = school / "mail" / "new"
        many.mkdir(exist_ok=True)
        template = next((school / "mail" / "cur").glob("1763384511.*")).read_text()  # Jane, personal
        for i in range(1500):
            text = template.replace("Message-ID: <", f"Message-ID: <bulk{i}.")
            (many / f"17640{i:05d}.M{i}P1.bulk").write_text(text)
        reference = school.parent / "reference"
        import shutil

        shutil.copytree(school, reference)
        cli("scan", "mail", "--config", reference / "config.toml", check=True)

        config = school / "config.toml"
        proc = start(config, None)
        db = school / "auditd.db"

        def first_batch_committed() -> bool:
            if not db.exists():
                return False
            try:
                with sqlite3.connect(db, timeout=1) as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM checkpoints WHERE source='sample-maildir'"
                    ).fetchone()
                return bool(row[0])
            except sqlite3.Error:
                return False

        try:
            wait_for(first_batch_committed, 20, "the first committed batch")
        finally:
            proc.kill()
            proc.wait(timeout=10)
        interrupted = [r for r in _runs(db) if r.source == "sample-maildir"]
        assert [r.status for r in interrupted] == ["running"], "killed after the scan, not during it"
        restarted = start(config, None)
        try:
            wait_for(
                lambda: any(r.source == "sample-maildir" and r.status == "ok" for r in _runs(db)),
                30,
                "the resumed scan",
            )
            restarted.send_signal(signal.SIGTERM)
            assert restarted.wait(timeout=10) == 0
        finally:
            if restarted.poll() is None:
                restarted.kill()

        def mail_findings(cfg: Path) -> list[tuple[str, int]]:
            out = json.loads(cli("findings", "--config", cfg, "--format", "json", check=True).stdout)
            return sorted((f["fingerprint_key"], f["occurrences"]) for f in map(_key, out) if f["mail"])

        assert mail_findings(config) == mail_findings(reference / "config.toml")


def _runs(db: Path) -> list[Any]:
    with Store.open(db) as store:
        return store.list_runs()


def _key(f: dict[str, Any]) -> dict[str, Any]:
    keys = sorted(e["key"] for e in f["evidence"])
    return {
        "fingerprint_key": f"{f['rule']}|{json.dumps(f['subject'], sort_keys=True)}|{keys}",
        "occurrences": f["occurrences"],
        "mail": f["rule"].startswith("MAIL-"),
    }


class TestSystemd:
    """The notify protocol without libsystemd."""

    def test_abstract_socket_names_start_with_at(self) -> None:
        name = f"choysez-auditd-test-{os.getpid()}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + name)
        sock.settimeout(1)
        try:
            assert sd_notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
            assert sock.recv(100) == b"READY=1"
        finally:
            sock.close()
        assert not sd_notify("READY=1", {})

    def test_watchdog_pings_at_half_the_interval_for_this_process_only(self) -> None:
        assert watchdog_interval({"WATCHDOG_USEC": "10000000"}, 42) == 5.0
        assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "41"}, 42) is None
        assert watchdog_interval({}, 42) is None


class TestRetention:
    """Findings, evidence, runs and checkpoints older than retention_days are gone after the purge."""

    def scanned(self, school: Path, cli: Run) -> Path:
        cli("scan", "mail", "--config", school / "config.toml", check=True)
        return school / "auditd.db"

    def counts(self, db: Path) -> dict[str, int]:
        with sqlite3.connect(db) as conn:
            return {
                t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("findings", "evidence", "checkpoints", "audit_log")
            }

    def test_the_daemons_purge_job_deletes_old_rows(self, school: Path, cli: Run) -> None:
        db = self.scanned(school, cli)
        before = self.counts(db)
        assert before["findings"] and before["evidence"] and before["checkpoints"]
        later = datetime.now(UTC) + timedelta(days=91)
        path = school / "config.toml"
        daemon = Daemon(path, load_all(path), clock=lambda: later, env={})
        daemon.purge()
        after = self.counts(db)
        assert after["findings"] == after["evidence"] == after["checkpoints"] == 0
        with Store.open(db) as store:
            entry = store.list_audit()[-1]
        assert entry.action == "retention.purge" and entry.details["findings"] == before["findings"]

    def test_purge_command_honours_retention_days_and_keeps_the_audit_log(
        self, school: Path, cli: Run
    ) -> None:
        db = self.scanned(school, cli)
        with Store.open(db) as store:
            store.audit("test", "marker", "store", {}, now=datetime.now(UTC) - timedelta(days=5))
        config = school / "config.toml"
        config.write_text(config.read_text().replace("retention_days = 90", "retention_days = 1"))
        # the sample mail is days old, but findings are kept by when they were last seen
        proc = cli("purge", "--config", config, check=True)
        assert "purged" in proc.stdout
        after = self.counts(db)
        assert after["findings"] == 0 and after["evidence"] == 0
        with Store.open(db) as store:
            assert any(e.action == "marker" for e in store.list_audit())
        assert load_config(config).store.audit_retention_days == 730
