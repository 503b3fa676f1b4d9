"""Benchmark the network-log readers against awk on generated Zeek ssl.log and Squid access.log.

    .venv/bin/python bench/logs.py [--lines 1000000] [--keep]

Writes, in a temporary folder, a TSV Zeek `ssl.log` (Zeek 6.0's field list, 18 columns) and a
native Squid `access.log` of `--lines` records each, with realistic names (a tenth of them streaming
services, the rest school traffic and CDNs, thousands of distinct names). Then times, each in a
fresh process: `choysez-auditd inspect --only-matches FILE` (this checkout's `python -m auditd.cli`,
output to /dev/null; split across the cores, and in one process), `read_log` alone in-process with
the same name filter the command uses, `read_log` building every observation (no filter), and awk
printing the name field. Prints wall times and the
ratio to awk; the target is within 2x. `--dir DIR` reuses the files a `--keep` run left; each time
is the best of `--repeat` runs (other work on the machine only ever adds time). It says first whether
the log scanners (`auditd.sources.logscan`) run compiled (`make speedups`) or as pure Python.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV_WORKERS = "CHOYSEZ_AUDITD_WORKERS"  # auditd.parallel's: 1 reads in one process
START = 1795511100.0  # 2026-11-24 09:05 UTC

STREAMING = [
    "ipv4-c001-lhr001-ix.1.oca.nflxvideo.net",
    "www.netflix.com",
    "linear012-gb-dash1-prd-ak.cdn.skycdp.com",
    "www.nowtv.com",
    "disney.api.edge.bamgrid.com",
]
OTHER = [
    "classroom.google.com",
    "teams.microsoft.com",
    "www.wikipedia.org",
    "login.microsoftonline.com",
    "www.bbc.co.uk",
    "fonts.gstatic.com",
    "rr3---sn-aigzrn7e.googlevideo.com",
]


def _names(rng: random.Random) -> tuple[list[str], list[str]]:
    cdn = [f"edge{i}.cdn{i % 37}.example-cdn.net" for i in range(4000)]
    return STREAMING, OTHER + cdn


def _uid(rng: random.Random) -> str:
    return "C" + "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", k=17))


def write_zeek(path: Path, lines: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    stream, other = _names(rng)
    fields = [
        "ts",
        "uid",
        "id.orig_h",
        "id.orig_p",
        "id.resp_h",
        "id.resp_p",
        "version",
        "cipher",
        "curve",
        "server_name",
        "resumed",
        "last_alert",
        "next_protocol",
        "established",
        "ssl_history",
        "cert_chain_fps",
        "client_cert_chain_fps",
        "sni_matches_cert",
    ]
    types = [
        "time",
        "string",
        "addr",
        "port",
        "addr",
        "port",
        "string",
        "string",
        "string",
        "string",
        "bool",
        "string",
        "string",
        "bool",
        "string",
        "vector[string]",
        "vector[string]",
        "bool",
    ]
    with path.open("w") as fh:
        fh.write("#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n#unset_field\t-\n#path\tssl\n")
        fh.write("#open\t2026-11-24-09-00-00\n#fields\t" + "\t".join(fields) + "\n")
        fh.write("#types\t" + "\t".join(types) + "\n")
        ts = START
        out = []
        for _i in range(lines):
            ts += rng.random() * 0.02
            name = rng.choice(stream) if rng.random() < 0.1 else rng.choice(other)
            fp = f"{rng.getrandbits(256):064x}"
            out.append(
                f"{ts:.6f}\t{_uid(rng)}\t10.20.{rng.randrange(10, 20)}.{rng.randrange(2, 250)}\t"
                f"{rng.randrange(49152, 65535)}\t"
                f"198.51.{rng.randrange(0, 255)}.{rng.randrange(1, 254)}\t443\t"
                f"TLSv13\tTLS_AES_128_GCM_SHA256\tx25519\t{name}\tF\t-\th2\tT\tCsiI\t{fp}\t(empty)\tT\n"
            )
            if len(out) == 10000:
                fh.writelines(out)
                out.clear()
        fh.writelines(out)
        fh.write("#close\t2026-11-24-10-00-00\n")


def write_squid(path: Path, lines: int, seed: int = 2) -> None:
    rng = random.Random(seed)
    stream, other = _names(rng)
    with path.open("w") as fh:
        ts = START
        out = []
        for i in range(lines):
            ts += rng.random() * 0.02
            name = rng.choice(stream) if rng.random() < 0.1 else rng.choice(other)
            server = f"198.51.{rng.randrange(0, 255)}.{rng.randrange(1, 254)}"
            client = f"10.20.{rng.randrange(10, 20)}.{rng.randrange(2, 250)}"
            if rng.random() < 0.8:
                req = f"TCP_TUNNEL/200 {rng.randrange(500, 50_000_000)} CONNECT {name}:443 -"
                typ = "-"
            else:
                req = f"TCP_MISS/200 {rng.randrange(200, 500_000)} GET http://{name}/path/{i}?q=1 -"
                typ = "text/html"
            out.append(f"{ts:.3f} {rng.randrange(1, 600_000):6d} {client} {req} HIER_DIRECT/{server} {typ}\n")
            if len(out) == 10000:
                fh.writelines(out)
                out.clear()
        fh.writelines(out)


READER = """
import sys
from pathlib import Path
from auditd.policy import load_policy
from auditd.pipeline import matches_only
from auditd.sources.netlogs import LogStats, read_log
path, kind, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
keep = matches_only(load_policy(None).classifier(None)) if mode == "filtered" else None
stats = LogStats()
n = sum(1 for _ in read_log(path, kind, source="bench", stats=stats, keep=keep))
print(n, stats.lines, stats.skipped, file=sys.stderr)
"""


def _time(cmd: list[str], repeat: int, env: dict[str, str] | None = None) -> tuple[float, str]:
    """The best wall time of `repeat` runs, from this checkout (cwd: so `-m auditd.cli` runs its code)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        best = min(best, time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
    return best, proc.stderr.strip()


def bench(path: Path, kind: str, awk_cmd: list[str], repeat: int) -> None:
    size = path.stat().st_size / 1e6
    print(f"\n{kind}: {path.name}, {size:.0f} MB")
    awk, _ = _time(awk_cmd, repeat)
    rows = [("awk (name field)", awk, "")]
    cmd = [sys.executable, "-m", "auditd.cli", "inspect", "--only-matches", str(path)]
    cli, _ = _time(cmd, repeat)
    rows.append(("choysez-auditd inspect --only-matches", cli, ""))
    one, _ = _time(cmd, repeat, {ENV_WORKERS: "1"})
    rows.append(("  the same in one process", one, ""))
    for mode in ("filtered", "all"):
        t, note = _time([sys.executable, "-c", READER, str(path), kind, mode], repeat)
        rows.append((f"read_log in-process ({mode})", t, f"observations, lines, skipped: {note}"))
    for label, t, note in rows:
        print(f"  {label:<40} {t:7.2f} s  {t / awk:5.2f}x awk  {note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--keep", action="store_true", help="keep the generated files (prints where)")
    ap.add_argument("--dir", type=Path, help="use the ssl.log and access.log a --keep run left here")
    ap.add_argument("--repeat", type=int, default=1, help="best of this many runs of each")
    args = ap.parse_args()
    awk = shutil.which("mawk") or shutil.which("awk") or "awk"
    tmp = args.dir or Path(tempfile.mkdtemp(prefix="auditd-bench-logs-"))
    try:
        zeek, squid = tmp / "ssl.log", tmp / "access.log"
        if args.dir is None:
            t0 = time.perf_counter()
            write_zeek(zeek, args.lines)
            write_squid(squid, args.lines)
            print(
                f"generated {args.lines} lines each in {time.perf_counter() - t0:.1f} s in {tmp} (awk: {awk})"
            )
        compiled = subprocess.run(
            [sys.executable, "-c", "import auditd.sources.logscan as m; print(m.__file__.endswith('.so'))"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout.strip()
        scanners = "compiled with mypyc" if compiled == "True" else "pure Python (run `make speedups`)"
        print(f"log scanners (auditd.sources.logscan): {scanners}")
        bench(zeek, "zeek", [awk, "-F\t", "!/^#/{print $10}", str(zeek)], args.repeat)
        bench(squid, "squid", [awk, "{print $7}", str(squid)], args.repeat)
    finally:
        if args.keep or args.dir is not None:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
