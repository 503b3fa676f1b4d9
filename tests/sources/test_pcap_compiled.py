"""The capture reader compiled with mypyc (`make speedups`) reads exactly what the pure-Python source reads.

Both are run in their own process on the same captures, the pure one from a copy of the package
without compiled modules, and every observation and count must be equal: the sample school's
capture, a generated benchmark-like capture (TLS, QUIC, DNS and bulk video), truncated and damaged
copies, and the shared corpus captures when present.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import auditd.sources.pcap
from tests.conftest import CORPUS, ROOT, SAMPLE, pure_python_tree, run_json

COMPILED = Path(auditd.sources.pcap.__file__).suffix == ".so"

READ = """
import json, sys
from pathlib import Path
import auditd.sources.pcap as pcap
out = {"module": pcap.__file__}
for name in sys.argv[1:]:
    stats = pcap.CaptureStats()
    try:
        obs = [repr(o) for o in pcap.read_capture(Path(name), source="t", stats=stats)]
    except Exception as exc:  # compared too: both must fail alike
        obs = [f"{type(exc).__name__}: {exc}"]
    out[Path(name).name] = {"obs": obs, "stats": repr(stats)}
print(json.dumps(out))
"""


def _captures(tmp_path: Path) -> list[Path]:
    spec = importlib.util.spec_from_file_location("bench_net", ROOT / "bench" / "net.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    generated = tmp_path / "generated.pcap"
    bench.generate(generated, 4)
    sample = (SAMPLE / "captures" / "sample.pcap").read_bytes()
    made = [generated, SAMPLE / "captures" / "sample.pcap"]
    for i, cut in enumerate((100, 5_000, 333_333, len(sample) - 7)):
        made.append(tmp_path / f"cut{i}.pcap")
        made[-1].write_bytes(sample[:cut])
    damaged = bytearray(generated.read_bytes()[:2_000_000])
    for at in range(40, len(damaged), 9_973):
        damaged[at] ^= 0x5A
    made.append(tmp_path / "damaged.pcap")
    made[-1].write_bytes(bytes(damaged))
    corpus = CORPUS / "pcap"
    if corpus.is_dir():
        made += sorted(p for p in corpus.iterdir() if p.suffix in (".pcap", ".pcapng"))
    return made


@pytest.mark.skipif(
    not COMPILED, reason="the capture reader is not compiled here (no C compiler): nothing to compare"
)
def test_compiled_reader_equals_pure_python(tmp_path: Path) -> None:
    pure = pure_python_tree(tmp_path / "pure")
    paths = _captures(tmp_path)
    compiled_out = run_json(READ, list(map(str, paths)), ROOT)
    pure_out = run_json(READ, list(map(str, paths)), pure)
    assert str(compiled_out.pop("module")).endswith(".so")
    assert str(pure_out.pop("module")).endswith("pcap.py")
    assert compiled_out.keys() == pure_out.keys() and len(compiled_out) == len(paths)
    for name in compiled_out:
        assert compiled_out[name] == pure_out[name], name
    generated = compiled_out["generated.pcap"]
    assert isinstance(generated, dict) and len(generated["obs"]) > 20  # the comparison saw real work
    assert "tls-sni" in str(generated["obs"]) and "quic-sni" in str(generated["obs"])
