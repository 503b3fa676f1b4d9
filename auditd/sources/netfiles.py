"""Network backends: capture files, network logs and the live spool, each a `NetSource`.

Each reads what is new since its checkpoints and classifies it with the policy's lists; the
pipeline commits the batch with its findings in one transaction (`pipeline.commit_net`).
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from functools import partial
from pathlib import Path

from auditd.classifier import Classifier, classify, connection, matches_only
from auditd.config import FileNetSource, LiveNetSource
from auditd.errors import SourceError
from auditd.model import NetObservation
from auditd.sources.base import NetBatch, NetSource
from auditd.sources.live import completed, spool_dir
from auditd.sources.netlogs import LogStats, Resume, checkpoint_for, detect_log, read_log, resume_point
from auditd.sources.pcap import CaptureStats, is_capture, read_capture
from auditd.store import CLAIM_LEASE, Store, file_identity, finished_log, reader_id


def net_source(
    config: FileNetSource | LiveNetSource, base: Path, *, store_path: Path, tz: tzinfo
) -> NetSource:
    """The backend for one `[[network.sources]]` entry; `base` resolves its path, `store_path` finds the
    live spool beside the store, `tz` dates log lines that carry no zone."""
    match config:
        case FileNetSource(type="pcap"):
            return CaptureFiles(config.name, config.resolved(base))
        case FileNetSource():
            return LogFiles(config.name, config.resolved(base), kind=config.type, tz=tz)
        case LiveNetSource():
            return LiveSpool(config.name, spool_dir(config, store_path))


def given_files(name: str, paths: Sequence[Path], *, tz: tzinfo) -> list[NetSource]:
    """Files named on the command line, read whole: network logs by what they hold, everything else
    as a capture (whose reader says what is wrong with a file that is neither)."""
    kinds = [(p, None if is_capture(p) else detect_log(p)) for p in paths]
    captures = [p for p, k in kinds if k is None]
    logs = [(p, k) for p, k in kinds if k is not None]
    sources: list[NetSource] = []
    if captures:
        sources.append(CaptureFiles(name, captures, incremental=False))
    if logs:
        sources.append(LogFiles(name, logs, tz=tz, incremental=False))
    return sources


def matching_files(pattern: str) -> list[Path]:
    """The files of a folder, or those a glob (or a plain path) matches."""
    p = Path(pattern)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.is_file())
    return [Path(x) for x in sorted(glob.glob(pattern)) if Path(x).is_file()]


def _file_state(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}-{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _read_captures(
    name: str, files: list[Path], store: Store, classifier: Classifier, *, incremental: bool
) -> NetBatch:
    """Capture files not read in their present state (checkpoint `file:PATH` -> `dev-ino:size:mtime_ns`)."""
    batch = NetBatch(files=len(files))
    # Connections named in earlier files or scans: a rotated capture continues them without a handshake.
    named = {
        conn: (o.host, o.via)
        for o in store.recent_observations(name, since=datetime.min.replace(tzinfo=UTC))
        if (conn := connection(o.flow)) is not None and o.via != "dns"
    }
    for f in files:
        state = _file_state(f)
        key = f"file:{f.resolve()}"
        if incremental and store.get_checkpoint(name, key) == state:
            continue
        stats = CaptureStats()
        for o in classify(read_capture(f, source=name, stats=stats), classifier, named):
            batch.items += 1
            if o.service is not None:
                batch.observations.append(o)
        batch.skipped += stats.skipped
        batch.problem(f, stats.first_skipped)
        batch.checkpoints.append((key, state))
    return batch


class CaptureFiles:
    """pcap/pcapng files: a configured folder or glob, followed file by file, or given files read whole."""

    def __init__(self, name: str, where: str | Sequence[Path], *, incremental: bool = True) -> None:
        self.name, self.where, self.incremental = name, where, incremental

    def read(self, store: Store, classifier: Classifier, now: datetime) -> NetBatch:
        if isinstance(self.where, str):
            files = matching_files(self.where)
            if not files:
                raise SourceError(f"no capture files match {self.where}")
        else:
            files = list(self.where)
        return _read_captures(self.name, files, store, classifier, incremental=self.incremental)


class LiveSpool:
    """The live source's spool: its completed capture files, dropped and deleted once committed.

    A spool that does not exist yet (no rotation finished) holds nothing: not an error.
    """

    def __init__(self, name: str, spool: Path) -> None:
        self.name, self.spool = name, spool

    def read(self, store: Store, classifier: Classifier, now: datetime) -> NetBatch:
        files = completed(self.spool)
        if not files:
            return NetBatch()
        batch = _read_captures(self.name, files, store, classifier, incremental=True)
        batch.spent = [(f, f"file:{f.resolve()}") for f in files]
        return batch


# Following a log: each run re-reads the last LOG_CONTEXT of what matched before (from the
# checkpoint's window offset), so that a session or a flow that straddles two runs is evaluated
# whole: Zeek's conn.log and Suricata's flow events are written when a connection ends, long after
# the name was logged, and a session needs all its observations. Findings are de-duplicated by
# fingerprint, so what the window shows again adds nothing; only lines after the checkpoint count
# as read or skipped. A session or flow longer than the window is seen only in part.
LOG_CONTEXT = timedelta(hours=2)


def _line_start(path: Path, end: int) -> int:
    """The offset of the start of the line that ends at `end` (just after its newline)."""
    pos = max(end - 1, 0)
    with path.open("rb") as fh:
        while pos > 0:
            step = min(pos, 64 * 1024)
            fh.seek(pos - step)
            chunk = fh.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                return pos - step + nl + 1
            pos -= step
    return 0


def _marked(
    found: Iterable[tuple[NetObservation, int]], marks: list[tuple[datetime, int]]
) -> Iterator[tuple[NetObservation, int]]:
    for o, end in found:
        marks.append((o.last_seen or o.ts, end))
        yield o, end


class LogFiles:
    """Zeek, Suricata, Squid, dnsmasq or BIND logs: a configured folder or glob followed from each file's
    checkpoint (`log:PATH`, see LOG_CONTEXT and netlogs), or given files (with their kinds) read whole.

    Finished files of a folder other daemons may read too are claimed first, so each is read once.
    """

    def __init__(
        self,
        name: str,
        where: str | Sequence[tuple[Path, str]],
        *,
        tz: tzinfo,
        kind: str = "",
        incremental: bool = True,
    ) -> None:
        self.name, self.where, self.kind, self.tz, self.incremental = name, where, kind, tz, incremental

    def _files(self) -> list[tuple[Path, str]]:
        if not isinstance(self.where, str):
            return list(self.where)
        # a Zeek folder also holds other files: only the logs of this source's type count
        files = [(f, self.kind) for f in matching_files(self.where) if detect_log(f) == self.kind]
        if not files:
            raise SourceError(f"no {self.kind} logs match {self.where}")
        return files

    def read(self, store: Store, classifier: Classifier, now: datetime) -> NetBatch:
        files = self._files()
        batch = NetBatch(files=len(files))
        keep = matches_only(classifier)
        for f, kind in files:
            key = f"log:{f.resolve()}"
            resume = resume_point(f, store.get_checkpoint(self.name, key)) if self.incremental else Resume()
            if resume.done:
                continue
            if self.incremental and finished_log(f):
                identity = file_identity(f)
                owner = reader_id(store.site)
                if not store.claim_file(
                    identity, source=self.name, path=str(f), owner=owner, now=now, lease=CLAIM_LEASE
                ):
                    continue
                batch.claimed.append(identity)
            part = partial(self._read_part, batch=batch, keep=keep, classifier=classifier, now=now)
            if resume.rotated is not None:
                part(
                    resume.rotated,
                    kind,
                    start=resume.rotated_context,
                    new_from=resume.rotated_offset,
                    hold_partial=False,
                )
            end, window = part(
                f, kind, start=resume.context, new_from=resume.offset, hold_partial=self.incremental
            )
            batch.checkpoints.append((key, checkpoint_for(f, end, window)))
        return batch

    def _read_part(
        self,
        path: Path,
        kind: str,
        *,
        start: int,
        new_from: int,
        hold_partial: bool,
        keep: Callable[[str], bool],
        classifier: Classifier,
        batch: NetBatch,
        now: datetime,
    ) -> tuple[int, int]:
        """Read `path` from `start`, keeping matched observations; (end offset, next window start)."""
        stats = LogStats(count_from=new_from)
        marks: list[tuple[datetime, int]] = []
        found = read_log(
            path,
            kind,
            source=self.name,
            stats=stats,
            offset=start,
            tz=self.tz,
            keep=keep,
            hold_partial=hold_partial,
        )
        for o in classify((o for o, _ in _marked(found, marks)), classifier):
            if o.service is not None:
                batch.observations.append(o)
        batch.items += stats.lines
        batch.skipped += stats.skipped
        batch.problem(path, stats.first_skipped)
        end = stats.end
        if not marks:
            return end, end
        cutoff = max(max(ts for ts, _ in marks), now) - LOG_CONTEXT
        after = [e for ts, e in marks if ts >= cutoff]
        return end, (_line_start(path, min(after)) if after else end)
