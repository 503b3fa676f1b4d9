"""`inspect --format jsonl` writes, for every log kind, exactly `json.dumps(net_json(o))` of the observations
the reader yields and the classifier fills in: including the Squid path that writes its JSON straight from
each line's fields, and the cached pieces of the other kinds."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from auditd.classifier import classify, load_classifier, matches_only
from auditd.cli import main, net_json
from auditd.sources import logscan
from auditd.sources.netlogs import LogStats, read_log
from tests.conftest import ROOT, pure_python_tree

DATA = ROOT / "tests" / "data" / "logs"
HOSTS = [
    "www.netflix.com",
    "ipv4-c001-lhr001-ix.1.oca.nflxvideo.net",
    "www.disneyplus.com",
    "fast.com",
    "en.wikipedia.org",
    "b\u00fccher.example",
    'odd"name\\.example',
]


def _squid_log(path: Path) -> Path:
    rng = random.Random(7)
    lines = []
    for i in range(2000):
        host = rng.choice(HOSTS)
        client = rng.choice(["10.20.12.34", "10.20.14.9", "2001:db8::7", 'x"y'])
        if rng.random() < 0.7:
            req = f"TCP_TUNNEL/200 {rng.randrange(0, 10**9)} CONNECT {host}:443 -"
        else:
            req = f"TCP_MISS/200 {rng.randrange(0, 10**6)} GET http://{host}/p/{i} -"
        peer = rng.choice(["HIER_DIRECT/198.51.100.7", "HIER_NONE/-"])
        lines.append(f"{1795511100 + i * 0.25:.3f} {rng.randrange(0, 10**6)} {client} {req} {peer} -")
        if i % 97 == 0:
            lines.append("garbage that is no squid line")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _inspect(*args: str) -> tuple[list[str], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["inspect", "--format", "jsonl", *args]) == 0
    return out.getvalue().splitlines(), err.getvalue()


@pytest.mark.parametrize("only", [True, False], ids=["only-matches", "all"])
@pytest.mark.parametrize(
    "name",
    ["generated-squid", "squid/access.log", "squid/access-combined.log", "zeek/ssl.log", "dns/pihole.log"],
)
def test_jsonl_is_json_dumps_of_the_observations(
    name: str, only: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHOYSEZ_AUDITD_CONFIG", str(tmp_path / "no-config.toml"))
    path = _squid_log(tmp_path / "access.log") if name == "generated-squid" else DATA / name
    got, err = _inspect(*(["--only-matches"] if only else []), str(path))
    kind = "squid" if "squid" in name else "zeek" if "zeek" in name else "dnsmasq"
    stats = LogStats()
    classifier = load_classifier(None)
    keep = matches_only(classifier) if only else None  # as inspect reads: the skips counted depend on it
    observations = (o for o, _ in read_log(path, kind, source=str(path), stats=stats, keep=keep))
    want = [
        json.dumps(net_json(o), ensure_ascii=False)
        for o in classify(observations, classifier)
        if not (only and o.service is None)
    ]
    assert got == want
    assert len(want) >= (300 if name == "generated-squid" else 1)
    if stats.skipped:
        assert f"{stats.skipped} lines skipped; first: {stats.first_skipped}" in err
    else:
        assert err == ""


@pytest.mark.skipif(not str(logscan.__file__).endswith(".so"), reason="not compiled here: nothing to compare")
def test_compiled_and_pure_python_write_the_same(tmp_path: Path) -> None:
    """The JSON writer (`logscan.log_jsonl`) compiled and as plain Python, through the command."""
    pure = pure_python_tree(tmp_path / "pure")
    log = _squid_log(tmp_path / "access.log")
    env = {**os.environ, "CHOYSEZ_AUDITD_CONFIG": str(tmp_path / "no-config.toml")}
    for args in (["--only-matches"], []):
        outs = []
        for tree in (ROOT, pure):
            proc = subprocess.run(
                [sys.executable, "-m", "auditd.cli", "inspect", "--format", "jsonl", *args, str(log)],
                capture_output=True,
                text=True,
                timeout=60,
                env={**env, "PYTHONPATH": str(tree)},
                cwd=tree,
                check=True,
            )
            outs.append(proc.stdout)
        assert outs[0] == outs[1] and outs[0].count("\n") >= 300
