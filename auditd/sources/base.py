"""The interfaces every source backend meets, and the factories that pick a backend for a config entry.

The pipeline and `check` see only `MailSource` and `NetSource`: how a backend reaches its mail
(files, IMAP, EWS, Graph) or its traffic (capture files, network logs, the live spool:
`auditd.sources.netfiles`) and what its checkpoints look like stay inside the backend.
`tests/mail/test_contract.py` and `tests/sources/test_net_contract.py` hold every backend to the same
behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from auditd.classifier import Classifier
from auditd.config import (
    EwsSource,
    FileMailSource,
    GraphSource,
    ImapSource,
    MailSourceConfig,
)
from auditd.model import ForwardingRule, MailMessage, NetObservation
from auditd.sources.mailfile import EmlFiles, MaildirFolder, MailStats, MboxFile
from auditd.store import Store

MailItems = Iterator[tuple[MailMessage | None, dict[str, str]]]


class MailSource(Protocol):
    """A place mail is read from, incrementally, without ever changing it."""

    name: str

    def read(self, previous: Mapping[str, str], stats: MailStats) -> MailItems:
        """Messages not read before, each with the checkpoint updates that hold once it is committed.

        `previous` is this source's saved checkpoints (key -> value); feeding back the merged updates
        of a pass makes the next pass yield only what arrived since. A `None` message is a
        checkpoint-only update. A message that cannot be parsed is counted in `stats`, not raised;
        a source that cannot be read raises SourceError (or InputError for a bad file).
        """
        ...

    def probe(self) -> None:
        """Check the source can be read (for `check`); raise SourceError in one line, no secret."""
        ...

    def forwarding_rules(self, now: datetime) -> list[ForwardingRule]:
        """The mailboxes' inbox rules that forward mail; [] where the backend has none."""
        ...


def mail_source(config: MailSourceConfig, base: Path) -> MailSource:
    """The backend for one `[[mail.sources]]` entry; `base` resolves its secret files.

    The server backends are imported when used: exchangelib and msal are slow to import and a
    deployment reading only Maildirs never needs them.
    """
    match config:
        case FileMailSource():
            files: dict[str, Callable[[str, Path], MailSource]] = {
                "maildir": MaildirFolder,
                "mbox": MboxFile,
                "eml": EmlFiles,
            }
            return files[config.type](config.name, config.path)
        case ImapSource():
            from auditd.sources.imap import ImapMailbox

            return ImapMailbox(config, base)
        case EwsSource():
            from auditd.sources.ews import EwsMailbox

            return EwsMailbox(config, base)
        case GraphSource():
            from auditd.sources.graph import GraphMailbox

            return GraphMailbox(config, base)


# ---- network ----------------------------------------------------------------------------------


@dataclass
class NetBatch:
    """What one read of a network source found, to be committed in one transaction with its findings.

    `observations` are the classified observations a list gives a service (the only ones rules look
    at); `checkpoints` (key, value) hold once they are committed; `claimed` are finished files this
    reader claimed (finished on commit); `spent` are files (with their checkpoint key) to drop, and
    then delete, after the commit: a spool, not an archive. `files` counts the files found, read or
    not: a source that found none has nothing to evaluate.
    """

    observations: list[NetObservation] = field(default_factory=list)
    checkpoints: list[tuple[str, str]] = field(default_factory=list)
    claimed: list[str] = field(default_factory=list)
    spent: list[tuple[Path, str]] = field(default_factory=list)
    files: int = 0
    items: int = 0
    skipped: int = 0
    first_problem: str | None = None

    def problem(self, where: Path, what: str | None) -> None:
        """Keep the first place a bad record was skipped at."""
        if what and self.first_problem is None:
            self.first_problem = f"{where}: {what}"


class NetSource(Protocol):
    """A place traffic is read from, incrementally, without ever changing it before the commit."""

    name: str

    def read(self, store: Store, classifier: Classifier, now: datetime) -> NetBatch:
        """What is new since this source's checkpoints in `store`, classified by `classifier`.

        Committing the batch's checkpoints makes the next read find nothing new. Bad records are
        counted in the batch, not raised; a source that cannot be found raises SourceError (InputError
        for a file that is not what it should be). Only claims of finished shared files are written,
        so that two readers never read the same file.
        """
        ...
