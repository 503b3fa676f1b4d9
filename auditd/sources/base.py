"""The one interface every mail backend meets, and the factory that picks a backend for a config entry.

The pipeline and `check` see only `MailSource`: how a backend reaches its mail (files, IMAP, EWS,
Graph) and what its checkpoints look like stay inside the backend. `tests/mail/test_contract.py`
holds every backend to the same behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Protocol

from auditd.config import EwsSource, FileMailSource, GraphSource, ImapSource, MailSourceConfig
from auditd.model import ForwardingRule, MailMessage
from auditd.sources.mailfile import EmlFiles, MaildirFolder, MailStats, MboxFile

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
