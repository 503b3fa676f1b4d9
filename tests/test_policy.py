"""The shipped policy data: it loads, names match on label boundaries, and risky names stay out."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from auditd.errors import ConfigError
from auditd.policy import Classifier, Policy, load_policy
from tests.conftest import ROOT

POLICIES = ROOT / "policies"
SERVICES = (
    "Netflix",
    "Sky Go",
    "NOW",
    "Disney+",
    "Prime Video",
    "Apple TV+",
    "BBC iPlayer",
    "ITVX",
    "Channel 4",
    "Channel 5",
    "Twitch",
    "Spotify",
    "DAZN",
    "YouTube",
    "Vimeo",
)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(POLICIES)


@pytest.fixture(scope="module")
def classifier(policy: Policy) -> Classifier:
    return policy.classifier()


def service(classifier: Classifier, host: str) -> str | None:
    hit = classifier.classify(host)
    return hit.service if hit else None


class TestShippedPolicy:
    def test_default_folder_loads(self) -> None:
        policy = load_policy()
        assert policy.folder.resolve() == POLICIES.resolve()
        assert policy.network.categories == ["streaming"]

    def test_every_listed_service_is_present_with_its_category(self, policy: Policy) -> None:
        categories = {s.name: s.category for s in policy.streaming.service}
        assert set(SERVICES) <= set(categories)
        assert categories["YouTube"] == categories["Vimeo"] == "video-sharing"
        assert {categories[s] for s in SERVICES if s not in ("YouTube", "Vimeo")} == {"streaming"}

    def test_every_entry_cites_a_source(self, policy: Policy) -> None:
        for svc in policy.streaming.service:
            assert svc.suffixes or svc.hosts, svc.name
            sources = [d.source for d in [*svc.suffixes, *svc.hosts]] + [r.source for r in svc.ranges]
            assert all(s.strip() for s in sources), svc.name
        for nv in policy.streaming.not_viewing:
            assert nv.source.strip() and nv.why.strip(), nv.name

    def test_no_name_is_listed_twice(self, policy: Policy) -> None:
        names = [
            (kind, d.name)
            for svc in policy.streaming.service
            for kind, entries in (("suffix", svc.suffixes), ("exact", svc.hosts))
            for d in entries
        ]
        assert len(names) == len(set(names))

    def test_risky_names_are_not_mapped_to_a_service(self, policy: Policy) -> None:
        suffixes = {d.name for svc in policy.streaming.service for d in [*svc.suffixes, *svc.hosts]}
        risky = {"sky.com", "bbc.co.uk", "bbc.com", "bbci.co.uk", "fast.com", "now.com", "now.com.hk"}
        risky |= {"media-amazon.com", "llnwd.net", "amazonaws.com", "akamaized.net"}
        risky |= {"intercom.io", "sentry.io", "ssl-images-amazon.com", "nowe.com"}
        assert not suffixes & risky

    def test_personal_providers(self, policy: Policy) -> None:
        personal = ("a@gmail.com", "b@HOTMAIL.CO.UK", "c@btinternet.com", "d@proton.me", "e@mail.sky.com")
        for address in personal:
            assert policy.is_personal_provider(address), address
        for address in ("jane.smith@choysez.org.uk", "x@notgmail.com", "y@gmail.com.example"):
            assert not policy.is_personal_provider(address), address


class TestMatching:
    @pytest.mark.parametrize(
        ("host", "expected"),
        [
            ("www.netflix.com", "Netflix"),
            ("NETFLIX.COM.", "Netflix"),
            ("ipv4-c001-lhr001-ix.1.oca.nflxvideo.net", "Netflix"),
            ("notnetflix.com", None),
            ("netflix.com.example", None),
            ("linear012-gb-dash1-prd-ak.cdn.skycdp.com", "Sky Go"),
            ("eu.api.atom.nowtv.com", "NOW"),
            ("now.com", None),
            ("vod-dash-uk-live.akamaized.net", "BBC iPlayer"),
            ("vs-hls-push-uk-live.akamaized.net", "BBC iPlayer"),
            ("other-uk-live.akamaized.net", None),
            ("www.itv.com", "ITVX"),
            ("prod-static.disney-plus.net", "Disney+"),
            ("video-edge-abc.ttvnw.net", "Twitch"),
            ("audio-ak-spotify-com.akamaized.net", "Spotify"),
            ("www.youtube.com", None),  # video-sharing is off by default
        ],
    )
    def test_service(self, classifier: Classifier, host: str, expected: str | None) -> None:
        assert service(classifier, host) == expected

    def test_speed_test_is_known_and_not_viewing(self, classifier: Classifier) -> None:
        for host in ("fast.com", "www.fast.com"):
            hit = classifier.classify(host)
            assert hit is not None and hit.service is None and "speed test" in hit.why

    @pytest.mark.parametrize("host", ["sky.com", "bbc.co.uk", "bbc.com", "bbci.co.uk"])
    def test_bare_broad_names_are_not_viewing(self, classifier: Classifier, host: str) -> None:
        hit = classifier.classify(host)
        assert hit is not None and hit.service is None and hit.why
        assert classifier.classify(f"news.{host}") is None  # exact only: subdomains are simply unknown

    def test_longest_listed_name_wins(self, classifier: Classifier) -> None:
        # amazon.com is not listed, atv-ps.amazon.com is; www.amazon.com stays unknown.
        assert service(classifier, "eu.atv-ps.amazon.com") == "Prime Video"
        assert classifier.classify("www.amazon.com") is None

    def test_youtube_only_when_its_category_is_enabled(self, policy: Policy) -> None:
        on = policy.classifier({"streaming", "video-sharing"})
        hit = on.classify("www.youtube.com")
        assert hit is not None and (hit.service, hit.category) == ("YouTube", "video-sharing")
        assert service(on, "rr3---sn-aigl6n7s.googlevideo.com") == "YouTube"
        assert service(on, "www.netflix.com") == "Netflix"
        only_sharing = policy.classifier({"video-sharing"})
        assert service(only_sharing, "www.netflix.com") is None

    def test_addresses(self, classifier: Classifier) -> None:
        netflix = classifier.classify_address("23.246.11.141")  # Open Connect server in netflix.pcap
        twitch = classifier.classify_address("52.223.198.7")  # server in tls-appdata.pcap
        assert netflix is not None and netflix.service == "Netflix" and netflix.matched == "23.246.0.0/18"
        assert twitch is not None and twitch.service == "Twitch" and twitch.matched == "52.223.192.0/18"
        v6 = classifier.classify_address("2a00:86c0:2042::1")
        assert v6 is not None and v6.service == "Netflix"
        assert classifier.classify_address("192.168.1.7") is None
        assert classifier.classify_address("not-an-ip") is None


class TestBrokenPolicy:
    def copy(self, tmp_path: Path) -> Path:
        folder = tmp_path / "policies"
        shutil.copytree(POLICIES, folder)
        return folder

    def test_bad_suffix_names_the_file(self, tmp_path: Path) -> None:
        folder = self.copy(tmp_path)
        path = folder / "streaming.toml"
        path.write_text(path.read_text().replace('name = "nflxso.net"', 'name = "nflx..net"', 1))
        with pytest.raises(ConfigError) as err:
            load_policy(folder)
        assert err.value.where == str(path)
        assert "service[0].suffixes[5].name" in str(err.value)

    def test_bad_range_and_unknown_key_name_the_file(self, tmp_path: Path) -> None:
        folder = self.copy(tmp_path)
        path = folder / "streaming.toml"
        text = path.read_text()
        path.write_text(text.replace('cidr = "52.223.192.0/18"', 'cidr = "52.223.198.0/18"', 1))
        with pytest.raises(ConfigError, match="not a network") as err:
            load_policy(folder)
        assert str(path) in str(err.value)
        path.write_text(text.replace('category = "streaming"', 'categroy = "streaming"', 1))
        with pytest.raises(ConfigError, match="unknown key"):
            load_policy(folder)

    def test_missing_providers_file(self, tmp_path: Path) -> None:
        folder = self.copy(tmp_path)
        (folder / "personal-mail-providers.toml").unlink()
        with pytest.raises(ConfigError, match="file not found") as err:
            load_policy(folder)
        assert err.value.where is not None and err.value.where.endswith("personal-mail-providers.toml")
