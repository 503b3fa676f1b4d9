"""A trust on one PostgreSQL store: two sites' `scan` processes at once, per-site and trust-wide
digests, and Zeek logs of several sensors read once by several daemons sharing the folder."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from auditd.config import load_config
from auditd.digest.send import collect
from auditd.policy import load_policy
from auditd.store import Store
from tests.conftest import COMMAND, ROOT, SAMPLE

ZEEK = ROOT / "tests" / "data" / "logs" / "zeek"


def school(dest: Path, *, site: str, url: str | None, zeek: bool = False) -> Path:
    """A copy of the sample school writing as `site` into the store at `url` (SQLite when None)."""
    shutil.copytree(SAMPLE, dest, ignore=shutil.ignore_patterns("auditd.db*", "out"))
    config = dest / "config.toml"
    text = config.read_text().replace("[organisation]\n", f'[organisation]\nsite = "{site}"\n', 1)
    if url is not None:
        text = text.replace('path = "auditd.db"\n', f'path = "auditd.db"\nurl = "{url}"\n', 1)
    if zeek:
        pcap = 'type = "pcap"\npath = "captures/*.pcap*"'
        text = text.replace(pcap, 'type = "zeek"\npath = "sensors/*/logs/*"')
    config.write_text(text)
    return config


def scan(*configs: Path, what: str) -> None:
    """Run `scan` for each config at the same time, as the sites' daemons would."""
    procs = [
        subprocess.Popen(
            [str(COMMAND), "scan", what, "--config", str(c)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in configs
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, f"exit {p.returncode}\n{out}\n{err}"


def test_two_sites_write_one_store_and_each_digest_is_right(pg_url: str, tmp_path: Path) -> None:
    if not COMMAND.exists():
        pytest.skip(f"{COMMAND} is not installed (run make test)")
    alone = school(tmp_path / "alone", site="north", url=None)  # the reference: one site on SQLite
    north = school(tmp_path / "north", site="north", url=pg_url)
    south = school(tmp_path / "south", site="south", url=pg_url)
    for what in ("mail", "net"):
        scan(alone, what=what)
        scan(north, south, what=what)
    config = load_config(north)
    policy = load_policy(config.policy.dir)
    now = datetime.now(UTC)
    window = (now - timedelta(hours=1), now + timedelta(hours=1))

    def digest(store: Store) -> list[tuple[str, str, str | None]]:
        data = collect(config, store, policy, date.today(), now, window=window)
        return sorted((f.rule, f.fingerprint, f.subject.staff) for f in data.new)

    with Store.connect(load_config(alone)) as ref:
        expected = digest(ref)
    assert len(expected) >= 3
    with Store.connect(config) as n, Store.connect(load_config(south)) as s:
        assert n.scope == "north" and s.scope == "south"
        assert digest(n) == expected and digest(s) == expected  # same input, same findings, per site
        n.scope = None  # a trust-wide reader
        assert digest(n) == sorted(expected + expected)
        assert {r.source for r in n.last_runs()} == {r.source for r in s.last_runs()}
        assert len(n.last_runs()) == 2 * len(s.last_runs())


def sensor_logs(root: Path, sensors: int, hours: int) -> int:
    """Rotated, compressed Zeek logs of several sensors; returns how many data lines they hold."""
    lines = 0
    for n in range(sensors):
        for h in range(hours):
            folder = root / "sensors" / f"sensor{n}" / "logs"
            folder.mkdir(parents=True, exist_ok=True)
            stamp = f"{9 + h:02d}:00:00-{10 + h:02d}:00:00"
            for log in ("ssl", "conn"):
                text = (ZEEK / f"{log}.log").read_text()
                shift = 3600 * h
                out = []
                for line in text.splitlines():
                    if not line.startswith("#") and line[:1].isdigit() and line.count("\t") > 2:
                        ts, rest = line.split("\t", 1)
                        uid, rest = rest.split("\t", 1)
                        line = "\t".join((f"{float(ts) + shift:.6f}", f"{uid}s{n}h{h}", rest))
                        lines += log == "ssl"
                    out.append(line)
                with gzip.open(folder / f"{log}.{stamp}.log.gz", "wt") as fh:
                    fh.write("\n".join(out) + "\n")
    return lines


def test_daemons_sharing_a_sensor_folder_read_each_file_once(pg_url: str, tmp_path: Path) -> None:
    if not COMMAND.exists():
        pytest.skip(f"{COMMAND} is not installed (run make test)")
    configs = [school(tmp_path / f"d{i}", site=f"site{i}", url=pg_url, zeek=True) for i in range(3)]
    shared = tmp_path / "shared"
    sensor_logs(shared, sensors=3, hours=4)
    for c in configs:
        (c.parent / "sensors").symlink_to(shared / "sensors")  # one folder, mounted by every daemon
    scan(*configs, what="net")
    scan(*configs, what="net")  # and again: nothing is read twice
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute("SELECT identity, owner, done_at FROM ingested_files").fetchall()
        items = conn.execute(
            "SELECT sum(items) FROM runs WHERE source = 'sample-captures' AND status = 'ok'"
        ).fetchone()[0]
    # ssl.log files are claimed (conn.log files are read beside them, joined, and claimed as well
    # when the daemon's glob lists them).
    assert len(rows) == len({r[0] for r in rows}) == 3 * 4 * 2
    assert all(done is not None for _, _, done in rows)
    # Every line read once in all: what one daemon alone reads.
    alone = school(tmp_path / "alone", site="alone", url=None, zeek=True)
    (alone.parent / "sensors").symlink_to(shared / "sensors")
    scan(alone, what="net")
    with Store.connect(load_config(alone)) as ref:
        expected = sum(r.items for r in ref.list_runs() if r.status == "ok")
    assert items == expected > 0
