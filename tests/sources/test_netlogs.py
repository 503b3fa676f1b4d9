"""Network-log readers: Zeek, Suricata EVE, Squid, dnsmasq/Pi-hole and BIND, and following a growing log.

Inputs are the small samples in tests/data/logs (written for these tests, see its README) and, when
present, the real public logs of the shared corpus.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from auditd.errors import InputError
from auditd.model import NetObservation
from auditd.sources import detect
from auditd.sources.netlogs import LOG_KINDS, LogStats, checkpoint_for, detect_log, read_log, resume_point
from tests.conftest import ROOT, Run, corpus_path

DATA = ROOT / "tests" / "data" / "logs"
ROOM12 = "10.20.12.34"


def read(path: Path, kind: str | None = None, **kw: object) -> tuple[list[NetObservation], LogStats]:
    stats = LogStats()
    kind = kind or detect_log(path)
    assert kind is not None, path
    obs = [o for o, _ in read_log(path, kind, source="test", stats=stats, **kw)]  # type: ignore[arg-type]
    return obs, stats


def by_host(obs: list[NetObservation]) -> dict[str, NetObservation]:
    return {o.host: o for o in obs}


class TestDetect:
    """Each format is told from its first lines, whatever the file is called."""

    @pytest.mark.parametrize(
        ("name", "kind"),
        [
            ("zeek/ssl.log", "zeek"),
            ("zeek/conn.log", "zeek"),
            ("zeek-json/ssl.log", "zeek"),
            ("suricata/eve.json", "suricata"),
            ("squid/access.log", "squid"),
            ("squid/access-combined.log", "squid"),
            ("dns/pihole.log", "dnsmasq"),
            ("dns/named-queries.log", "bind"),
            ("dns/named-syslog.log", "bind"),
        ],
    )
    def test_samples(self, name: str, kind: str, tmp_path: Path) -> None:
        assert detect_log(DATA / name) == kind
        assert detect(DATA / name) == f"log:{kind}"
        renamed = tmp_path / "whatever.txt"
        shutil.copy(DATA / name, renamed)
        assert detect_log(renamed) == kind

    def test_gzip_is_sniffed_and_read_whole(self, tmp_path: Path) -> None:
        gz = tmp_path / "eve.json.gz"
        gz.write_bytes(gzip.compress((DATA / "suricata/eve.json").read_bytes()))
        assert detect_log(gz) == "suricata"
        plain, _ = read(DATA / "suricata/eve.json")
        packed, _ = read(gz, offset=500)  # no resuming inside gzip: the offset is ignored
        assert packed == plain

    def test_not_a_log(self, tmp_path: Path) -> None:
        text = tmp_path / "notes.txt"
        text.write_text("Dear parents,\nthe trip is on Friday.\n")
        binary = tmp_path / "junk.bin"
        binary.write_bytes(bytes(range(256)) * 8)
        assert detect_log(text) is None and detect_log(binary) is None
        assert detect_log(ROOT / "README.md") is None
        with pytest.raises(InputError):
            detect(binary)

    def test_unknown_kind_is_input_error(self) -> None:
        with pytest.raises(InputError):
            read(DATA / "zeek/ssl.log", "snort")
        assert set(LOG_KINDS) == {"zeek", "suricata", "squid", "dnsmasq", "bind"}


class TestZeek:
    """dns/ssl/http/quic records, joined to conn.log by uid for bytes and span."""

    def test_ssl_joined_to_conn(self) -> None:
        obs, stats = read(DATA / "zeek/ssl.log")
        video = by_host(obs)["ipv4-c001-lhr001-ix.1.oca.nflxvideo.net"]
        assert video.client == ROOM12 and video.server == "198.51.100.20" and video.via == "log"
        assert video.bytes == 1_310_000 + 186_000_000  # IP bytes both ways
        assert video.first_seen == datetime(2026, 11, 24, 9, 5, 3, 550000, tzinfo=UTC)
        assert video.last_seen == datetime(2026, 11, 24, 9, 25, 3, 550000, tzinfo=UTC)
        assert video.flow == "CNflxVid9z8y7x6w5"
        assert video.ts.tzinfo is not None and video.ts.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        assert "-" not in by_host(obs)  # a record without SNI names nothing
        assert stats.lines == 6 and stats.skipped == 2
        assert stats.first_skipped == "line 13: expected 18 fields, got 4"

    def test_without_conn_log_bytes_are_unknown(self, tmp_path: Path) -> None:
        shutil.copy(DATA / "zeek/ssl.log", tmp_path / "ssl.log")
        obs, _ = read(tmp_path / "ssl.log")
        assert len(obs) == 3 and all(o.bytes is None and o.first_seen is None for o in obs)

    def test_rotated_names_join_their_own_period(self, tmp_path: Path) -> None:
        shutil.copy(DATA / "zeek/ssl.log", tmp_path / "ssl.09:00:00-10:00:00.log")
        shutil.copy(DATA / "zeek/conn.log", tmp_path / "conn.09:00:00-10:00:00.log")
        shutil.copy(DATA / "zeek/conn.log", tmp_path / "conn.log")
        (tmp_path / "conn.log").write_text("")  # a different period's conn.log must not be used
        obs, _ = read(tmp_path / "ssl.09:00:00-10:00:00.log")
        assert all(o.bytes for o in obs)

    def test_dns_http_quic(self) -> None:
        (dns,), _ = read(DATA / "zeek/dns.log")
        assert (dns.host, dns.client, dns.server, dns.bytes) == ("www.netflix.com", ROOM12, "10.0.0.1", None)
        (http,), _ = read(DATA / "zeek/http.log")  # no #close: a log still being written
        assert http.host == "intranet.example.org" and http.bytes == 5960
        (quic,), _ = read(DATA / "zeek/quic.log")
        assert quic.host == "rr3---sn-aigl6nze.googlevideo.com" and quic.bytes == 25_664_000

    def test_json_lines_with_epoch_and_iso_time(self) -> None:
        obs, stats = read(DATA / "zeek-json/ssl.log")
        hosts = by_host(obs)
        assert hosts["ipv4-c001-lhr001-ix.1.oca.nflxvideo.net"].bytes == 187_310_000
        assert hosts["en.wikipedia.org"].ts == datetime(2026, 11, 24, 9, 6, 30, tzinfo=UTC)
        assert stats.skipped == 1 and stats.first_skipped == "line 3: not JSON"

    def test_a_broken_separator_escape_makes_lines_skipped_not_a_crash(self, tmp_path: Path) -> None:
        text = (DATA / "zeek/ssl.log").read_text().replace("#separator \\x09", "#separator \\x\x009", 1)
        assert text.startswith("#separator \\x\x009")
        (tmp_path / "ssl.log").write_text(text)
        obs, stats = read(tmp_path / "ssl.log")
        assert obs == [] and stats.skipped == stats.lines == 6
        assert stats.first_skipped == "line 9: data line before any #fields header"  # #fields did not split

    def test_resume_from_offset_reads_the_header_again(self) -> None:
        stats = LogStats()
        pairs = list(read_log(DATA / "zeek/ssl.log", "zeek", source="t", stats=stats))
        after_first = pairs[0][1]
        rest, _ = read(DATA / "zeek/ssl.log", offset=after_first)
        assert [o.host for o in rest] == [o.host for o, _ in pairs[1:]]
        assert stats.end == (DATA / "zeek/ssl.log").stat().st_size

    def test_corpus_rita_joins_conn_and_names_streaming(self) -> None:
        path = corpus_path("logs", "rita__proxy_rolling__ssl.16_00_00-17_00_00.log")
        corpus_path("logs", "rita__proxy_rolling__conn.16_00_00-17_00_00.log")
        obs, stats = read(path)
        assert stats.skipped == 0 and len(obs) == 2733
        assert sum(o.bytes is not None for o in obs) > 500
        assert {"vimeo.com", "player.vimeo.com"} <= {o.host for o in obs}

    def test_corpus_zeek_json_streaming_lines(self) -> None:
        obs, stats = read(corpus_path("logs", "zed-sample-data__zeek-json__ssl.streaming-lines.json"))
        assert stats.skipped == 0 and len(obs) == 81
        youtube = re.compile(r"youtube|googlevideo|ytimg|youtu\.be|yt3\.ggpht")  # the corpus README's pattern
        assert sum(bool(youtube.search(o.host)) for o in obs) == 67

    def test_corpus_btest_baselines_with_masked_times_are_skipped_not_fatal(self) -> None:
        obs, stats = read(corpus_path("logs", "zeek__opt.basic__dns.log"))
        assert obs == [] and stats.skipped == stats.lines == 34
        assert stats.first_skipped == "line 10: bad ts 'XXXXXXXXXX.XXXXXX'"

    def test_corpus_bro_http_with_conn(self) -> None:
        obs, _ = read(corpus_path("logs", "lnav__test__logfile_bro_http.log.0"))
        assert len(obs) == 197 and all(o.bytes is not None for o in obs)
        assert "www.youtube.com" in {o.host for o in obs}


class TestSuricata:
    """EVE dns (v1, v2, v3), tls, http and quic events; bytes from flow events by flow_id."""

    def test_sample(self) -> None:
        obs, stats = read(DATA / "suricata/eve.json")
        assert stats.skipped == 3 and stats.first_skipped == "line 5: not JSON"
        names = [(o.host, o.client) for o in obs]
        assert names.count(("www.netflix.com", ROOM12)) == 2  # the dns query, and the tls; not the answer
        assert ("www.disneyplus.com", "10.20.12.35") in names  # v1 answer-only: client is the non-53 side
        assert ("www.nowtv.com", "10.20.12.36") in names  # v3 queries[]
        tls = next(o for o in obs if o.flow == "2002")
        assert tls.bytes == 187_310_000 and tls.server == "198.51.100.20"
        assert tls.first_seen == datetime(2026, 11, 24, 9, 5, 3, 550000, tzinfo=UTC)
        assert by_host(obs)["intranet.example.org"].bytes == 5960
        assert by_host(obs)["rr3---sn-aigl6nze.googlevideo.com"].last_seen == datetime(
            2026, 11, 24, 9, 15, tzinfo=UTC
        )
        assert all(o.bytes is None for o in obs if o.flow in ("1001", "1002", "1003"))

    def test_a_record_whose_flow_is_not_yet_logged_has_no_bytes(self, tmp_path: Path) -> None:
        lines = (DATA / "suricata/eve.json").read_text().splitlines()
        cut = tmp_path / "eve.json"
        cut.write_text("\n".join(ln for ln in lines if '"flow_id":2002,"event_type":"flow"' not in ln) + "\n")
        obs, _ = read(cut)
        assert [o.bytes for o in obs if o.flow == "2002"] == [None]

    def test_corpus(self) -> None:
        obs, stats = read(corpus_path("logs", "surevego__testdata__eve.json"))
        assert stats.skipped == 0 and sum(o.bytes is not None for o in obs) == 68
        obs, _ = read(corpus_path("logs", "nicoaller-suricata-log-analyzer__eve.json"))
        assert "self.events.data.microsoft.com" in {o.host for o in obs}


class TestSquid:
    """Native access.log (CONNECT host, bytes, elapsed) and common/combined format."""

    def test_native(self) -> None:
        obs, stats = read(DATA / "squid/access.log")
        video = by_host(obs)["ipv4-c001-lhr001-ix.1.oca.nflxvideo.net"]
        assert (video.client, video.server, video.bytes) == (ROOM12, "198.51.100.20", 187_310_000)
        assert video.last_seen == datetime(2026, 11, 24, 9, 25, 3, 550000, tzinfo=UTC)
        assert video.first_seen == datetime(2026, 11, 24, 9, 5, 3, 550000, tzinfo=UTC)
        assert by_host(obs)["intranet.example.org"].server == ""  # HIER_NONE/-, user@ and port dropped
        assert stats.lines == 7 and stats.skipped == 2
        assert stats.first_skipped == "line 6: elapsed or bytes is not a number"

    def test_combined(self) -> None:
        obs, stats = read(DATA / "squid/access-combined.log")
        assert [o.host for o in obs] == ["www.netflix.com", "en.wikipedia.org", "intranet.example.org"]
        assert obs[0].bytes == 6120 and obs[2].bytes is None and obs[0].server == ""
        assert stats.skipped == 1 and "bad time" in (stats.first_skipped or "")

    def test_corpus(self) -> None:
        obs, stats = read(corpus_path("logs", "ServerKittingForLinuC2__squid_access.log"))
        assert len(obs) == 122 and stats.skipped == 0
        assert obs[0].host == "www.google.com" and obs[0].server == "172.217.161.68"
        obs, _ = read(corpus_path("logs", "SPLcli__tests__test_files__access.log"))  # no final newline
        assert [o.host for o in obs] == ["login.yahoo.com", "www.goonernews.com", "www.goonernews.com"]


class TestDnsLogs:
    """dnsmasq/Pi-hole and BIND query logs: lookups only, times in the given zone."""

    def test_dnsmasq(self) -> None:
        obs, stats = read(DATA / "dns/pihole.log")
        assert [(o.host, o.client) for o in obs] == [
            ("www.netflix.com", ROOM12),
            ("ipv4-c001-lhr001-ix.1.oca.nflxvideo.net", ROOM12),
            ("www.nowtv.com", "fd00:20:12::35"),
            ("www.disneyplus.com", "10.20.12.36"),
        ]
        assert all(o.server == "" and o.bytes is None for o in obs)
        assert stats.skipped == 2 and stats.first_skipped == "line 10: not a dnsmasq log line"

    def test_bind_forms(self) -> None:
        obs, stats = read(DATA / "dns/named-queries.log")
        assert [(o.host, o.client, o.server) for o in obs] == [
            ("www.netflix.com", ROOM12, "10.0.0.1"),
            ("www.disneyplus.com", "10.20.12.35", "10.0.0.1"),
            ("www.nowtv.com", "10.20.12.36", "10.0.0.1"),
        ]
        assert obs[0].ts == datetime(2026, 11, 24, 9, 5, 1, 2000, tzinfo=UTC) and stats.skipped == 0
        syslog, _ = read(DATA / "dns/named-syslog.log")
        assert [o.client for o in syslog] == [ROOM12, "fd00:20:12::34"]

    def test_local_time_and_year_from_mtime(self, tmp_path: Path) -> None:
        log = tmp_path / "pihole.log"
        log.write_text(
            "Dec 31 23:59:58 dnsmasq[1]: query[A] a.example from 10.0.0.2\n"
            "Jul  1 10:00:00 dnsmasq[1]: query[A] b.example from 10.0.0.2\n"
        )
        mtime = datetime(2027, 7, 2, 12, tzinfo=UTC).timestamp()
        os.utime(log, (mtime, mtime))
        obs, _ = read(log, tz=ZoneInfo("Europe/London"))
        assert obs[0].ts == datetime(2026, 12, 31, 23, 59, 58, tzinfo=UTC)  # GMT, the year before
        assert obs[1].ts == datetime(2027, 7, 1, 9, tzinfo=UTC)  # BST

    def test_corpus(self) -> None:
        obs, stats = read(corpus_path("logs", "RaspberryPi-Pihole-Display__pihole.log"))
        assert stats.skipped == 0 and {"media.netflix.com", "cdn0.nflximg.net"} <= {o.host for o in obs}
        obs, stats = read(corpus_path("logs", "dnsfw__queries.log"))
        assert len(obs) == 33 and obs[0].client == "192.168.0.51" and stats.skipped == 0
        obs, _ = read(corpus_path("logs", "dnsproject__queries.log"))
        assert sum(o.host == "www.youtube.com" for o in obs) == 4


class TestBadInput:
    """Garbage is counted and skipped, never raised."""

    @pytest.mark.parametrize("kind", LOG_KINDS)
    def test_random_bytes_and_mangled_lines(self, kind: str, tmp_path: Path) -> None:
        rng = random.Random(kind)
        samples = [p for p in DATA.rglob("*") if p.is_file() and detect_log(p) == kind]
        lines = [ln for p in samples for ln in p.read_bytes().splitlines(keepends=True)]
        junk = []
        for ln in lines * 3:
            cut = rng.randrange(len(ln) + 1)
            junk.append(
                rng.choice([ln[:cut] + b"\n", ln.replace(b"\t", b" "), bytes(rng.randbytes(40)) + b"\n", ln])
            )
        path = tmp_path / "junk.log"
        path.write_bytes(b"".join(junk))
        stats = LogStats()
        for o, end in read_log(path, kind, source="t", stats=stats):
            assert isinstance(o, NetObservation) and 0 < end <= path.stat().st_size
        assert stats.end == path.stat().st_size


class TestFollow:
    """Where a growing, truncated or rotated log is resumed."""

    def test_grown_truncated_rotated(self, tmp_path: Path) -> None:
        log = tmp_path / "access.log"
        body = (DATA / "squid/access.log").read_bytes().splitlines(keepends=True)
        log.write_bytes(b"".join(body[:3]))
        _, stats = read(log)
        cp = checkpoint_for(log, stats.end)
        log.write_bytes(b"".join(body[:5]))  # grown in place
        assert resume_point(log, cp).offset == stats.end
        log.write_bytes(body[0][:10])  # truncated
        assert resume_point(log, cp).offset == 0
        log.write_bytes(b"".join(body[:3]))
        cp = checkpoint_for(log, stats.end)
        log.rename(tmp_path / "access.log.1")  # logrotate: moved aside, a new file in its place
        log.write_bytes(body[3])
        r = resume_point(log, cp)
        assert (r.offset, r.rotated, r.rotated_offset) == (0, tmp_path / "access.log.1", stats.end)

    def test_partial_last_line_is_held_back(self, tmp_path: Path) -> None:
        log = tmp_path / "pihole.log"
        whole = (DATA / "dns/pihole.log").read_bytes()
        log.write_bytes(whole[:100])  # the second line is half written
        stats = LogStats()
        got = list(read_log(log, "dnsmasq", source="t", stats=stats, hold_partial=True))
        assert len(got) == 1 and stats.end == whole.index(b"\n") + 1
        assert len(list(read_log(log, "dnsmasq", source="t", stats=LogStats()))) == 1

    def test_gzip_checkpoint_is_done(self, tmp_path: Path) -> None:
        gz = tmp_path / "ssl.log.gz"
        gz.write_bytes(gzip.compress((DATA / "zeek/ssl.log").read_bytes()))
        assert resume_point(gz, checkpoint_for(gz, 0)).done
        assert not resume_point(gz, None).done


class TestCommands:
    """inspect and scan net on logs, through the installed command."""

    def test_inspect_only_matches(self, cli: Run) -> None:
        proc = cli("inspect", "--only-matches", DATA / "squid/access.log", DATA / "dns/pihole.log")
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(ln) for ln in proc.stdout.splitlines()]
        assert rows and all(r["via"] == "log" and r["service"] for r in rows)
        assert {"Netflix", "NOW", "Disney+"} <= {r["service"] for r in rows}
        assert "squid/access.log: 1 lines skipped" in proc.stderr

    def test_scan_net_log_files_find_the_session(self, cli: Run, school: Path) -> None:
        config = school / "config.toml"
        proc = cli("scan", "net", "--config", config, DATA / "zeek/ssl.log", check=True)
        assert "1 new findings" in proc.stdout
        found = json.loads(cli("findings", "--config", config, "--format", "json", check=True).stdout)
        net = [f for f in found if f["rule"] == "NET-STREAMING-IN-CLASS" and f["subject"]["device"] == ROOM12]
        assert net and net[0]["subject"]["service"] == "Netflix"

    def test_configured_squid_source_follows_the_log(self, cli: Run, school: Path) -> None:
        logs = school / "logs"
        logs.mkdir()
        body = (DATA / "squid/access.log").read_bytes().splitlines(keepends=True)
        (logs / "access.log").write_bytes(b"".join(body[:2]))
        config = school / "config.toml"
        with config.open("a") as fh:
            fh.write('\n[[network.sources]]\nname = "proxy"\ntype = "squid"\npath = "logs/access.log"\n')
        first = cli("scan", "net", "--config", config, "--source", "proxy", check=True)
        assert "proxy: 2 items read, 1 new findings" in first.stdout
        with (logs / "access.log").open("ab") as fh:
            fh.write(b"".join(body[2:4]))
        second = cli("scan", "net", "--config", config, "--source", "proxy", check=True)
        assert "proxy: 2 items read, 0 new findings" in second.stdout
