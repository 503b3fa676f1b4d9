"""The console's fixtures: a sample school with one hostile message, its accounts, and the running console.

The console runs as the installed command (`choysez-auditd console --port 0`) on a private copy of
the sample school after `demo` filled its store, exactly as an ICT manager would start it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import COMMAND, SAMPLE

PASSWORD = "correct horse battery staple"
ACCOUNTS = {
    "ict-manager": "ict.manager@choysez.org.uk",
    "centre-manager": "centre.manager@choysez.org.uk",
    "dsl": "dsl@choysez.org.uk",
    "viewer": "viewer@choysez.org.uk",
}
LOCKOUT_ACCOUNT = "locked.out@choysez.org.uk"
HOSTILE_SUBJECT = "Homework <script>document.title='pwned'</script> and the trip"

# A business message from Jane Smith's declared personal address to a parent, with markup in its
# subject line: it becomes evidence of a MAIL-PERSONAL-SENDER finding, so the console shows it.
HOSTILE_MESSAGE = f"""\
Received: from mail-ej1-f41.google.com (mail-ej1-f41.google.com [209.85.218.41])
\tby mx.example.net with ESMTPS id 7Hc2; Tue, 24 Nov 2026 10:00:09 +0000
From: "Jane Smith" <jane.smith77@gmail.com>
To: "Mark Evans" <mark.evans@example.net>
Subject: {HOSTILE_SUBJECT}
Date: Tue, 24 Nov 2026 10:00:00 +0000
Message-ID: <CAJ7x0vQ1m3hostile@mail.gmail.com>
MIME-Version: 1.0
Content-Type: text/plain; charset="utf-8"

Dear Mr Evans,

Lily's homework for Choysez is due on Friday, and the trip consent form too.

Jane
"""


@dataclass(frozen=True)
class Console:
    url: str
    config: Path
    findings: list[dict[str, object]]

    def finding_id(self, rule: str, **subject: str) -> int:
        for f in self.findings:
            s = f["subject"]
            assert isinstance(s, dict)
            if f["rule"] == rule and all(s.get(k) == v for k, v in subject.items()):
                return int(str(f["id"]))
        raise AssertionError(f"no {rule} finding for {subject}")

    @property
    def hostile_id(self) -> int:
        for f in self.findings:
            if HOSTILE_SUBJECT in json.dumps(f["evidence"]):
                return int(str(f["id"]))
        raise AssertionError("the hostile message made no finding")


def _run(*args: str | Path) -> str:
    proc = subprocess.run(
        [str(COMMAND), *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="session")
def console_school(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample school with the hostile message, scanned by `demo`, with one account per role."""
    assert COMMAND.exists(), f"{COMMAND} is not installed (run make test)"
    school = tmp_path_factory.mktemp("console") / "school"
    shutil.copytree(SAMPLE, school, ignore=shutil.ignore_patterns("auditd.db*", "out"))
    (school / "mail" / "cur" / "1764000000.M900P1.mail1.choysez.org.uk:2,S").write_text(HOSTILE_MESSAGE)
    config = school / "config.toml"
    # Plain HTTP on loopback for the test browser: the only place cookie_secure = false is allowed.
    config.write_text(config.read_text() + '\n[console]\nhost = "127.0.0.1"\ncookie_secure = false\n')
    _run("demo", "--config", config, "--out", school / "out")
    secret = school / "password.txt"
    secret.write_text(PASSWORD + "\n")
    for role, email in ACCOUNTS.items():
        _run("users", "add", email, "--role", role, "--password-file", secret, "--config", config)
    _run("users", "add", LOCKOUT_ACCOUNT, "--role", "viewer", "--password-file", secret, "--config", config)
    return school


@pytest.fixture(scope="session")
def console(console_school: Path) -> Iterator[Console]:
    """`choysez-auditd console --port 0` running; stopped with SIGTERM at the end."""
    config = console_school / "config.toml"
    findings = json.loads(_run("findings", "--config", config, "--format", "json"))
    proc = subprocess.Popen(
        [str(COMMAND), "console", "--config", str(config), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+/)", line)
        if not match:
            proc.kill()
            raise AssertionError(f"console did not start: {line}{proc.communicate(timeout=10)}")
        yield Console(match.group(1), config, findings)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"console exited {proc.returncode} on SIGTERM"
