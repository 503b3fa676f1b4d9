"""Load: a store of 50,000 findings still lists, exports and writes the digest (bench/store_load.py
does the same with 1,000,000 and times it). Completion and correct counts are asserted, not times.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from tests.conftest import ROOT, Run

sys.path.insert(0, str(ROOT / "bench"))
import store_load

N = 50_000


class TestBigStore:
    """Every listing and the digest complete on a store of 50,000 findings."""

    def test_list_export_and_digest(self, cli: Run, tmp_path: Path) -> None:
        school = store_load.school_copy(tmp_path / "school")
        store_load.build(school, N, datetime.now(UTC))
        config = school / "config.toml"

        rows = list(
            csv.reader(io.StringIO(cli("findings", "--config", config, "--format", "csv", check=True).stdout))
        )
        assert len(rows) == N + 1
        found = json.loads(cli("findings", "--config", config, "--format", "json", check=True).stdout)
        assert len(found) == N and all(len(f["evidence"]) == 1 for f in found[:100])
        table = cli("findings", "--config", config, "--status", "open", check=True).stdout
        opened = sum(1 for i in range(N) if store_load.STATUSES[i % len(store_load.STATUSES)] == "open")
        assert table.rstrip().endswith(f"{opened} findings")
        out = school / "out" / "digest.html"
        cli("digest", "--config", config, "--format", "html", "--output", out, check=True)
        assert "<html" in out.read_text()
