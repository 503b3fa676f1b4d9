"""Every network backend meets the `NetSource` contract: read what is new, classified, then nothing more.

Each backend is built by `net_source` from a config entry, as the pipeline builds it, over the sample
school's capture (copied; for the live spool, as a completed rotation) or the hand-written logs in
tests/data/logs (see their README). Batches are committed by the pipeline's own `commit_net` into a real
store, so "nothing new" is what the next scan would really see.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from auditd.config import FileNetSource, LiveNetSource, load_config
from auditd.errors import SourceError
from auditd.pipeline import Context, SourceReport, commit_net
from auditd.sources.base import NetBatch, NetSource
from auditd.sources.netfiles import LiveSpool, net_source
from auditd.store import Store
from tests.conftest import ROOT, SAMPLE

LOGS = ROOT / "tests" / "data" / "logs"
# A day after the logs' Tuesday morning and the capture's Monday: past every log's re-read window,
# so a second read re-reads nothing.
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
BACKENDS = ["pcap", "zeek", "squid", "live"]
# a service each backend's data shows (the sample's Room 12 and the logs' device both watch Netflix)
SERVICE = "Netflix"


@dataclass
class Case:
    """A backend holding traffic, the same backend pointed at nothing, and the files it reads."""

    good: NetSource
    missing: NetSource
    files: list[Path]


def _build(fields: dict[str, Any], school: Path) -> NetSource:
    config: FileNetSource | LiveNetSource
    if fields["type"] == "live":
        config = LiveNetSource.model_validate(fields)
    else:
        config = FileNetSource.model_validate(fields)
    return net_source(config, school, store_path=school / "auditd.db", tz=UTC)


@pytest.fixture
def school(tmp_path: Path) -> Path:
    dest = tmp_path / "school"
    shutil.copytree(SAMPLE, dest, ignore=shutil.ignore_patterns("auditd.db*", "out", "captures", "mail"))
    return dest


@pytest.fixture(params=BACKENDS)
def case(request: pytest.FixtureRequest, school: Path) -> Case:
    kind: str = request.param
    name = f"contract-{kind}"
    if kind == "live":
        spool = school / "spool"
        spool.mkdir()
        pcap = spool / "live-20261123T0900.pcap"
        shutil.copy(SAMPLE / "captures" / "sample.pcap", pcap)
        (spool / "live-20261123T0905.pcap.part").write_bytes(b"")  # still being written: not read
        fields = {"name": name, "type": "live", "interface": "eth0"}
        return Case(
            _build({**fields, "spool": str(spool)}, school),
            _build({**fields, "spool": str(school / "no-spool")}, school),
            [pcap],
        )
    if kind == "pcap":
        folder = school / "captures"
        folder.mkdir()
        shutil.copy(SAMPLE / "captures" / "sample.pcap", folder / "sample.pcap")
        files = [folder / "sample.pcap"]
        path, missing = str(folder / "*.pcap"), str(school / "nothing" / "*.pcap")
    else:
        folder = shutil.copytree(LOGS / kind, school / kind)
        files = sorted(folder.iterdir())
        path, missing = str(folder), str(school / "nothing")
    return Case(
        _build({"name": name, "type": kind, "path": path}, school),
        _build({"name": name, "type": kind, "path": missing}, school),
        files,
    )


@pytest.fixture
def ctx(school: Path) -> Iterator[Context]:
    store = Store.open(school / "auditd.db")
    try:
        yield Context.load(load_config(school / "config.toml"), store)
    finally:
        store.close()


def _read(source: NetSource, ctx: Context) -> NetBatch:
    return source.read(ctx.store, ctx.classifier(), NOW)


def _commit(source: NetSource, ctx: Context, batch: NetBatch) -> SourceReport:
    report = SourceReport(source.name, "net")
    commit_net(ctx, source.name, batch, report, NOW)
    return report


class TestContract:
    """What the pipeline relies on from every network backend."""

    def test_first_read_yields_classified_observations_named_after_the_source(
        self, case: Case, ctx: Context
    ) -> None:
        batch = _read(case.good, ctx)

        assert batch.observations
        assert {o.source for o in batch.observations} == {case.good.name}
        # only what a list names is kept, and it is classified
        assert all(o.service is not None and o.category is not None for o in batch.observations)
        assert SERVICE in {o.service for o in batch.observations}
        assert batch.items >= len(batch.observations)
        assert batch.checkpoints and all(isinstance(v, str) and v for _, v in batch.checkpoints)
        assert batch.files >= 1

    def test_after_the_commit_a_second_read_yields_nothing_new(self, case: Case, ctx: Context) -> None:
        first = _read(case.good, ctx)
        report = _commit(case.good, ctx, first)
        assert report.items == first.items and report.error is None

        again = _read(case.good, ctx)
        _commit(case.good, ctx, again)

        assert again.observations == []
        assert again.items == 0 and again.skipped == 0
        assert _read(case.good, ctx).observations == []

    def test_the_commit_keeps_the_checkpoints_in_the_store(self, case: Case, ctx: Context) -> None:
        batch = _read(case.good, ctx)
        _commit(case.good, ctx, batch)

        saved = ctx.store.get_checkpoints(case.good.name)
        if batch.spent:
            # a spool's files are gone once committed, and so are their checkpoints
            assert not any(f.exists() for f in case.files)
            assert all(key not in saved for _, key in batch.spent)
        else:
            assert dict(batch.checkpoints) == {k: saved[k] for k, _ in batch.checkpoints}
            assert all(f.exists() for f in case.files)  # read, never changed

    def test_a_missing_place_is_one_source_error_line(self, case: Case, ctx: Context) -> None:
        if isinstance(case.good, LiveSpool):
            # A live spool appears with the capture's first rotation: until then there is nothing to read.
            assert _read(case.missing, ctx) == NetBatch()
            return
        with pytest.raises(SourceError) as exc:
            _read(case.missing, ctx)

        text = str(exc.value)
        assert "\n" not in text and "nothing" in text
