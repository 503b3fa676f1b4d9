"""A private Dovecot IMAP server on 127.0.0.1, for the tests and the benchmark.

No system service is touched: the server gets its own config, run, state and log folders under one
temporary folder and runs in the foreground (`dovecot -F`) as our child. Dovecot refuses to keep
mail as root (uid 0) and to run its login process as root, so when we are root the mail belongs to
`nobody` and logins run as `dovenull` (or `nobody`); otherwise everything runs as us.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.certs import self_signed

DOVECOT = Path("/usr/sbin/dovecot")
USER = "audit"
PASSWORD = "correct horse battery staple"


def available() -> bool:
    return DOVECOT.exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no client trusts: to show TLS is verified."""
    return self_signed(folder, "dovecot")


class Dovecot:
    """One Dovecot with one user (`audit`), a plain IMAP port and an implicit-TLS port."""

    def __init__(self, *, oauth2_introspection: str | None = None) -> None:
        """`oauth2_introspection`: also accept XOAUTH2/OAUTHBEARER logins, each token checked by a
        POST to this URL (RFC 7662 introspection), which must answer `{"active": true, "username": ...}`."""
        self.oauth2_introspection = oauth2_introspection
        # Not pytest's tmp_path: its parent is 0700 root, which the mail user could not enter.
        self.root = Path(tempfile.mkdtemp(prefix="auditd-dovecot-"))
        self.root.chmod(0o755)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tls_port = free_port()
        self.user = USER
        self.password = PASSWORD
        self.home = self.root / "home"
        self.maildir = self.home / "Maildir"
        self.log = self.root / "dovecot.log"
        self.conf = self.root / "dovecot.conf"
        if os.geteuid() == 0:
            mail = pwd.getpwnam("nobody")
            self.uid, self.gid = mail.pw_uid, mail.pw_gid
            internal = "root"
            login = "dovenull" if _user_exists("dovenull") else "nobody"
        else:
            self.uid, self.gid = os.geteuid(), os.getegid()
            internal = login = pwd.getpwuid(self.uid).pw_name
        self._internal, self._login = internal, login
        self.process: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> None:
        for sub in ("run", "state"):
            (self.root / sub).mkdir(exist_ok=True)
        self.home.mkdir(exist_ok=True)
        os.chown(self.home, self.uid, self.gid)
        passwd = self.root / "passwd"
        passwd.write_text(f"{self.user}:{{PLAIN}}{self.password}::::\n")
        passwd.chmod(0o600)
        cert, key = _self_signed(self.root)
        group = "root" if os.geteuid() == 0 else grp.getgrgid(self.gid).gr_name
        mechanisms, password_only, oauth2 = "plain login", "", ""
        if self.oauth2_introspection is not None:
            ext = self.root / "dovecot-oauth2.conf.ext"
            ext.write_text(
                f"introspection_mode = post\nintrospection_url = {self.oauth2_introspection}\n"
                "username_attribute = username\nactive_attribute = active\nactive_value = true\n"
            )
            mechanisms = "plain login xoauth2 oauthbearer"
            password_only = "\n  mechanisms = plain login"
            oauth2 = f"passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {ext}\n}}\n"
        self.conf.write_text(
            f"""
base_dir = {self.root}/run
state_dir = {self.root}/state
log_path = {self.log}
protocols = imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
auth_failure_delay = 0
# no growing delay for 127.0.0.1 after a test's deliberate failed login
login_trusted_networks = 127.0.0.0/8
default_internal_user = {self._internal}
default_internal_group = {group}
default_login_user = {self._login}
first_valid_uid = {min(self.uid, 1)}
first_valid_gid = 0
mail_location = maildir:{self.maildir}
mail_fsync = never
mail_max_userip_connections = 50
passdb {{
  driver = passwd-file{password_only}
  args = scheme=PLAIN username_format=%u {passwd}
}}
{oauth2}userdb {{
  driver = static
  args = uid={self.uid} gid={self.gid} home={self.home}
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.tls_port}
    ssl = yes
  }}
}}
"""
        )

    def start(self) -> Dovecot:
        self._write_config()
        self.process = subprocess.Popen(
            [str(DOVECOT), "-F", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                message = f"dovecot exited at start: {err}\n{self.log_text()}"
                self.stop()
                raise RuntimeError(message)
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    if s.recv(100).startswith(b"* OK"):
                        return self
            except OSError:
                time.sleep(0.05)
        message = f"dovecot did not answer within 15 s\n{self.log_text()}"
        self.stop()
        raise RuntimeError(message)

    def stop(self, *, fast: bool = False) -> None:
        """Shut down and delete everything; `fast` kills it outright (its children follow at once)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if fast else signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        for _ in range(20):  # after a kill, its children may still write their last lines
            shutil.rmtree(self.root, ignore_errors=True)
            if not self.root.exists():
                return
            time.sleep(0.1)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def client(self) -> Any:
        """A logged-in imapclient connection for test setup (APPEND, CREATE, STORE...)."""
        from imapclient import IMAPClient

        c = IMAPClient(self.host, port=self.port, ssl=False, timeout=30)
        c.login(self.user, self.password)
        return c

    def reset_mailbox(self) -> None:
        """An empty mailbox with a new INBOX (UIDs from 1). Call with no session open."""
        shutil.rmtree(self.maildir, ignore_errors=True)

    def logged_out_bytes(self) -> list[int]:
        """Bytes the server sent in each finished IMAP session (`out=` of its logout lines), in order."""
        return [int(x) for x in re.findall(r"Logged out in=\d+ out=(\d+)", self.log_text())]

    def chown_mail(self) -> None:
        """After writing into the Maildir directly (the benchmark), give it back to the mail user."""
        for dirpath, _dirs, files in os.walk(self.home):
            os.chown(dirpath, self.uid, self.gid)
            for f in files:
                os.chown(os.path.join(dirpath, f), self.uid, self.gid)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
