"""`load_classifier`: the cached classifier is the validated one, and only for the very same files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from auditd.classifier import Classifier, cache_dir, load_classifier
from auditd.errors import ConfigError
from auditd.policy import load_policy
from tests.conftest import ROOT

POLICIES = ROOT / "policies"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    where = cache_dir()
    assert where is not None
    return where


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    dest = tmp_path / "policies"
    shutil.copytree(POLICIES, dest)
    return dest


def test_cached_classifier_equals_the_validated_one(cache: Path, policies: Path) -> None:
    fresh = load_policy(policies).classifier()
    first = load_classifier(policies)
    assert len(list(cache.glob("classifier-*.json"))) == 1
    second = load_classifier(policies)  # from the cache
    for got in (first, second):
        assert got == fresh
        assert got.classify("ipv4-c001-lhr001-ix.1.oca.nflxvideo.net") == fresh.classify(
            "ipv4-c001-lhr001-ix.1.oca.nflxvideo.net"
        )
    assert second.classify("www.netflix.com") is not None
    assert second.classify("notnetflix.com") is None
    assert second.networks and second.classify_address(str(second.networks[0][0][1])) is not None


def test_categories_have_their_own_entries(cache: Path, policies: Path) -> None:
    streaming = load_classifier(policies)
    with_video = load_classifier(policies, {"streaming", "video-sharing"})
    assert streaming.classify("www.youtube.com") is None  # YouTube is off by default
    hit = with_video.classify("www.youtube.com")
    assert hit is not None and hit.service == "YouTube"
    assert len(list(cache.glob("classifier-*.json"))) == 2


def test_an_edited_policy_is_validated_again(cache: Path, policies: Path) -> None:
    load_classifier(policies)
    streaming = policies / "streaming.toml"
    streaming.write_text(streaming.read_text().replace('name = "netflix.com"', 'name = "netflix.example"', 1))
    hit = load_classifier(policies).classify("www.netflix.example")
    assert hit is not None and hit.service == "Netflix"
    streaming.write_text(streaming.read_text() + "\n[[service]]\nname = 'Broken'\n")  # no category
    with pytest.raises(ConfigError, match=r"streaming\.toml"):
        load_classifier(policies)


def test_a_damaged_cache_entry_is_rebuilt(cache: Path, policies: Path) -> None:
    load_classifier(policies)
    (entry,) = cache.glob("classifier-*.json")
    entry.write_text('{"exact": ')
    assert load_classifier(policies) == load_policy(policies).classifier()
    assert entry.read_text().startswith('{"exact": {')


def test_an_unwritable_cache_only_costs_time(cache: Path, policies: Path) -> None:
    cache.parent.mkdir(parents=True)
    cache.write_text("a file where the cache folder should be")  # fails for root too
    assert load_classifier(policies) == load_policy(policies).classifier()
    assert cache.is_file()


def test_no_home_means_no_cache(monkeypatch: pytest.MonkeyPatch, policies: Path) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("HOME", raising=False)
    assert cache_dir() is None
    got: Classifier = load_classifier(policies)
    assert got == load_policy(policies).classifier()


def test_inspect_without_a_config_leaves_the_validators_unloaded(tmp_path: Path) -> None:
    """Start-up time of `inspect` on a big file: no pydantic, config, store or mail modules once the
    bundled policy has been validated and cached."""
    import subprocess
    import sys

    code = (
        "import sys; from auditd.cli import main; rc = main(sys.argv[1:]); "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'pydantic' or m in "
        "('auditd.config', 'auditd.store', 'auditd.pipeline', 'auditd.sources.mailfile', 'email.message')); "
        "print(rc, heavy, file=sys.stderr)"
    )
    env = {**os.environ, "CHOYSEZ_AUDITD_CONFIG": str(tmp_path / "none.toml")}
    logs = ROOT / "tests" / "data" / "logs"
    for inputs in (
        [ROOT / "deploy/sample-school/captures/sample.pcap"],
        [logs / "zeek/ssl.log", logs / "squid/access.log", logs / "suricata/eve.json"],
        [logs / "dns/pihole.log"],
    ):
        first = [sys.executable, "-c", code, "inspect", *map(str, inputs)]
        subprocess.run(first, env=env, timeout=60, check=True, capture_output=True)
        proc = subprocess.run(  # the second run: the policy was validated by the first
            [sys.executable, "-c", code, "inspect", "--only-matches", *map(str, inputs)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
        )
        assert proc.stderr.strip().splitlines()[-1] == "0 []", proc.stderr
