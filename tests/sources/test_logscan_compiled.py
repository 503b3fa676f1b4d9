"""The Zeek and Squid readers' block scanners compiled with mypyc (`make speedups`, module
`auditd.sources.logscan`) read exactly what the pure-Python source reads.

As for the capture reader (test_pcap_compiled.py): both are run in their own process on the same
logs, the pure one from a copy of the package without compiled modules, and every observation and
count must be equal. Each log is read whole (all names, and only some names as `--only-matches`
does), in three ranges as `auditd.parallel` splits it, resumed from the middle (`count_from`), and
with its unterminated last line held back: the shipped sample logs, generated benchmark-like logs
(several blocks of lines), the same with bad lines mixed in (wrong field counts, bad times, unset
fields, blank and CRLF lines, JSON and common-format lines, a second header, odd white space),
gzip and unterminated copies, odd TSV separators, and the shared corpus logs when present.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from pathlib import Path

import pytest

import auditd.sources.logscan
from tests.conftest import CORPUS, ROOT, pure_python_tree, run_json

COMPILED = Path(auditd.sources.logscan.__file__).suffix == ".so"
DATA = ROOT / "tests" / "data" / "logs"

READ = """
import json, sys
from pathlib import Path
import auditd.sources.logscan as logscan
from auditd.sources.netlogs import LogStats, read_log

def keep(name):  # wants about two names in three, as a policy wants some
    return len(name) % 3 != 0

def read(path, kind, **kw):
    stats = LogStats(count_from=kw.pop("count_from", 0))
    try:
        obs = [(repr(o), end) for o, end in read_log(path, kind, source="t", stats=stats, **kw)]
    except Exception as exc:  # compared too: both must fail alike
        obs = [f"{type(exc).__name__}: {exc}"]
    return {"obs": obs, "stats": repr(stats)}

def starts(data, parts):  # line starts cutting the file in `parts`, as auditd.parallel cuts it
    cuts = [0]
    for k in range(1, parts):
        at = data.find(b"\\n", len(data) * k // parts) + 1
        cuts.append(at if at > cuts[-1] else cuts[-1])
    return cuts + [len(data)]

out = {"module": logscan.__file__}
for arg in sys.argv[1:]:
    kind, _, name = arg.partition(":")
    path = Path(name)
    data = path.read_bytes()
    cuts, quarters = starts(data, 3), starts(data, 4)
    out[arg] = {
        "all": read(path, kind),
        "some": read(path, kind, keep=keep),
        "ranges": [read(path, kind, keep=keep, offset=a, stop=b) for a, b in zip(cuts, cuts[1:])],
        "resumed": read(path, kind, keep=keep, offset=quarters[1], count_from=quarters[2]),
        "held": read(path, kind, hold_partial=True),
    }
print(json.dumps(out))
"""


ZEEK_BAD = [
    b"\n",
    b"  \t \n",
    b"1795511100.5\tCx\t10.20.12.34\n",  # too few fields, name field missing
    b"1795511100.5\tCx\t10.20.12.34\t1\t2\t443\tv\tc\tx\twww.netflix.com\tF\n",  # too few fields
    b"-\tCx\t10.20.12.34\t1\t198.51.100.1\t443\tv\tc\tx\twww.netflix.com\tF\t-\th2\tT\tC\t-\t-\t-\n",
    b"soon\tCx\t10.20.12.34\t1\t198.51.100.1\t443\tv\tc\tx\twww.bbc.co.uk\tF\t-\th2\tT\tC\t-\t-\t-\n",
    b"1e400\tCx\t10.20.12.34\t1\t198.51.100.1\t443\tv\tc\tx\twww.nowtv.com\tF\t-\th2\tT\tC\t-\t-\t-\n",
    b"1795511100.5\tCx\t-\t1\t198.51.100.1\t443\tv\tc\tx\twww.netflix.com\tF\t-\th2\tT\tC\t-\t-\t-\n",
    b"1795511100.5\t-\t10.20.12.34\t1\t-\t443\tv\tc\tx\twww.netflix.com:8443\tF\t-\th2\tT\tC\t-\t-\t-\r\n",
    b"1795511100.5\tCx\t10.20.12.34\t1\t2\t443\tv\tc\tx\t-\tF\t-\th2\tT\tC\t-\t-\t-\n",
    b"1795511100.5\tCx\t10.20.12.34\t1\t2\t443\tv\tc\tx\t(empty)\tF\t-\th2\tT\tC\t-\t-\t-\n",
    b"1795511100.5\tCx\t10.20.12.34\t1\t2\t443\tv\tc\tx\t\xff\xfe.example\tF\t-\th2\tT\tC\t-\t-\t-\n",
    b"1795511100.5\tCx\t10.20.12.34\t1\t2\t443\tv\tc\tx\twww.netflix.com\tF\t-\th2\tT\tC\t-\t-\t-\textra\n",
    b'{"_path": "ssl", "ts": 1795511100.5, "server_name": "www.netflix.com", "id.orig_h": "10.20.12.9"}\n',
    b"{not json\n",
]

SQUID_BAD = [
    b"\n",
    b"   \n",
    b"1795511100.123 5 10.20.12.34 TCP_TUNNEL/200 10 CONNECT www.netflix.com:443 -\n",  # 8 fields
    b"1795511100.123 5 10.20.12.34 TCP_TUNNEL/200 10 CONNECT www.netflix.com:443\n",  # 7 fields
    b"1795511100.123 5 10.20.12.34 TCP_TUNNEL 10 CONNECT www.netflix.com:443 - HIER_DIRECT/1.2.3.4 -\n",
    b"1795511100.123 5 10.20.12.34 /200 10 CONNECT www.netflix.com:443 - HIER_DIRECT/1.2.3.4 -\n",
    b"1795511100.123 - 10.20.12.34 TCP_TUNNEL/200 10 CONNECT www.netflix.com:443 - HIER_DIRECT/1.2.3.4 -\n",
    b"1795511100.1 99999999999999999 10.0.0.1 TCP_MISS/200 1 GET http://www.bbc.co.uk/ - HIER_NONE/- -\n",
    b"1795511100.1 900000000000 10.0.0.1 TCP_MISS/200 1 GET http://www.bbc.co.uk/ - HIER_NONE/- -\n",
    b"soon 5 10.20.12.34 TCP_TUNNEL/200 10 CONNECT www.nowtv.com:443 - HIER_DIRECT/1.2.3.4 -\n",
    b" 1795511100.1\t5\x0b10.0.0.1 TCP_TUNNEL/200\x0c10 CONNECT a.nowtv.com - HIER_DIRECT/1.2.3.4\x0c-\r\n",
    b"1795511100.123 5 10.20.12.34 TCP_MISS/200 10 GET /relative/path - HIER_NONE/- -\n",
    b"1795511100.123 5 10.20.12.34 TCP_MISS/200 10 GET 1a://www.netflix.com/ - HIER_NONE/- -\n",
    b"1795511100.123 5 10.20.12.34 TCP_MISS/200 10 GET http://u@WWW.Netflix.com:80 - HIER_NONE/- -\n",
    b"1795511100.123 5 10.20.12.34 TCP_MISS/200 10 GET http://www.netflix.com?q=/x - HIER_DIRECT/\xff -\n",
    b"1795511100.123 5 10.20.12.34 TCP_TUNNEL/200 10 CONNECTX www.netflix.com:443 - HIER_DIRECT/1.2.3.4 -\n",
    b"garbage that is not a squid line\n",
]


def _bench() -> object:
    spec = importlib.util.spec_from_file_location("bench_logs", ROOT / "bench" / "logs.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _damaged(lines: list[bytes], bad: list[bytes], rng: random.Random, extra: list[bytes]) -> bytes:
    out = list(lines)
    for at in sorted(rng.sample(range(len(out)), 400), reverse=True):
        out.insert(at, rng.choice(bad))
    for line in extra:  # near the end: the blocks before take the hot path (none does before a memo fills)
        out.insert(rng.randrange(len(out) * 19 // 20, len(out)), line)
    return b"".join(out)


def _logs(tmp_path: Path) -> list[str]:
    bench = _bench()
    rng = random.Random(7)
    zeek, squid = tmp_path / "ssl.log", tmp_path / "access.log"
    bench.write_zeek(zeek, 16_000)  # type: ignore[attr-defined]
    bench.write_squid(squid, 30_000)  # type: ignore[attr-defined]
    made = [f"zeek:{zeek}", f"squid:{squid}"]
    zlines = zeek.read_bytes().splitlines(keepends=True)
    header = [ln for ln in zlines if ln.startswith(b"#") and not ln.startswith(b"#close")]
    second = [
        b"#close\t2026-11-24-10-00-00\n",
        *header[:6],
        header[6].replace(b"\tuid\t", b"\tuidx\t"),
        header[7],
    ]
    bad_zeek = tmp_path / "bad" / "ssl.log"
    bad_zeek.parent.mkdir()
    bad_zeek.write_bytes(b"".join(header) + _damaged(zlines[len(header) :], ZEEK_BAD, rng, second))
    bad_squid = tmp_path / "bad" / "access.log"
    common = b'10.20.12.34 - - [24/Nov/2026:09:05:01 +0000] "CONNECT www.netflix.com:443 HTTP/1.1" 200 1834\n'
    ipv6 = b"1795511100.1 5 10.0.0.1 TCP_TUNNEL/200 10 CONNECT [2001:db8::1]:443 - HIER_DIRECT/1.2.3.4 -\n"
    bad_squid.write_bytes(
        _damaged(squid.read_bytes().splitlines(keepends=True), SQUID_BAD, rng, [common, ipv6, b"# x\n"])
    )
    made += [f"zeek:{bad_zeek}", f"squid:{bad_squid}"]
    for kind, path in (("zeek", bad_zeek), ("squid", bad_squid)):
        gz = tmp_path / "gz" / path.name
        gz.parent.mkdir(exist_ok=True)
        gz.write_bytes(gzip.compress(path.read_bytes()))
        cut = tmp_path / "cut" / path.name
        cut.parent.mkdir(exist_ok=True)
        cut.write_bytes(path.read_bytes()[:-30])  # ends inside a line
        made += [f"{kind}:{gz}", f"{kind}:{cut}"]
    # Other separators: one byte, the name field last (it keeps its newline when split), and two bytes.
    for name, sep in (("pipe", b"|"), ("two", b"||")):
        fields = [b"ts", b"uid", b"id.orig_h", b"id.resp_h", b"server_name"]
        text = b"#separator " + b"".join(b"\\x%02x" % c for c in sep) + b"\n#path\tssl\n"
        text += b"#fields" + sep + sep.join(fields) + b"\n"
        for i in range(3000):
            host = rng.choice([b"www.netflix.com", b"ab.example", b"-", b"www.bbc.co.uk", b"x" * (i % 7)])
            text += sep.join(
                [b"1795511100.%d" % i, b"C%d" % i, b"10.20.12.%d" % (i % 9), b"198.51.100.1", host]
            )
            text += rng.choice([b"\n", b"\n", b"\r\n", sep + b"\n"])
        path = tmp_path / name / "ssl.log"
        path.parent.mkdir()
        path.write_bytes(text)
        made.append(f"zeek:{path}")
    made += [
        f"zeek:{p}" for p in sorted((DATA / "zeek").glob("*.log")) + sorted((DATA / "zeek-json").glob("*"))
    ]
    made += [f"squid:{p}" for p in sorted((DATA / "squid").glob("*.log"))]
    corpus = CORPUS / "logs"
    if corpus.is_dir():
        for p in sorted(corpus.iterdir()):
            if "squid" in p.name or p.name.endswith("access.log"):
                made.append(f"squid:{p}")
            elif p.name.startswith(("zeek", "rita", "zed-", "lnav")):
                made.append(f"zeek:{p}")
    return made


@pytest.mark.skipif(
    not COMPILED, reason="the log scanners are not compiled here (no C compiler): nothing to compare"
)
def test_compiled_scanners_equal_pure_python(tmp_path: Path) -> None:
    pure = pure_python_tree(tmp_path / "pure")
    logs = _logs(tmp_path)
    compiled_out = run_json(READ, logs, ROOT)
    pure_out = run_json(READ, logs, pure)
    assert str(compiled_out.pop("module")).endswith(".so")
    assert str(pure_out.pop("module")).endswith("logscan.py")
    assert compiled_out.keys() == pure_out.keys() and len(compiled_out) == len(logs)
    for name in compiled_out:
        assert compiled_out[name] == pure_out[name], name
    # The comparison saw real work: observations, bad lines counted, and both separators' paths.
    for name in logs[:4]:
        got = compiled_out[name]
        assert isinstance(got, dict)
        assert len(got["all"]["obs"]) > 5_000 and len(got["some"]["obs"]) < len(got["all"]["obs"])
    for name in logs[2:4]:
        got = compiled_out[name]
        assert isinstance(got, dict) and "skipped=0," not in got["all"]["stats"]


def test_elapsed_beyond_a_timedelta_is_a_bad_line(tmp_path: Path) -> None:
    """An elapsed time no `timedelta` holds, or one reaching back before year 1, is counted and
    skipped (it used to stop the read with OverflowError); compiled or not."""
    from auditd.sources.netlogs import LogStats, read_log

    log = tmp_path / "access.log"
    line = "1795511100.1 {} 10.0.0.1 TCP_MISS/200 1 GET http://www.bbc.co.uk/ - HIER_NONE/- -\n"
    log.write_text("".join(line.format(ms) for ms in (99999999999999999, 90000000000000, 900000000000)))
    stats = LogStats()
    obs = [o for o, _ in read_log(log, "squid", source="t", stats=stats)]
    assert [o.first_seen.year if o.first_seen else None for o in obs] == [1998]
    assert (stats.lines, stats.skipped, stats.first_skipped) == (3, 2, "line 1: elapsed out of range")


def test_iso_json_is_the_quoted_isoformat() -> None:
    """`inspect`'s fast time text is exactly `json.dumps(dt.isoformat())` (compiled or not): UTC
    times with and without microseconds, years below 1000, other zones and naive times."""
    from datetime import UTC, datetime, timedelta, timezone

    from auditd.sources.logscan import iso_json

    rng = random.Random(3)
    zones = [UTC, UTC, timezone(timedelta(0)), timezone(timedelta(hours=-5, minutes=-30)), None]
    for _ in range(20_000):
        moment = datetime(
            rng.choice([1, 9, 999, 1000, 1970, 2026, 9999]),
            rng.randint(1, 12),
            rng.randint(1, 28),
            rng.randint(0, 23),
            rng.randint(0, 59),
            rng.randint(0, 59),
            rng.choice([0, 1, 999_999, rng.randint(0, 999_999)]),
            tzinfo=rng.choice(zones),
        )
        assert iso_json(moment) == json.dumps(moment.isoformat()), moment
