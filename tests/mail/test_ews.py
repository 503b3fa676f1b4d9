"""The EWS source against a local SOAP peer serving recorded, documented responses.

exchangelib does the talking: version discovery (ConvertId), GetFolder, SyncFolderItems pages,
GetItem, GetInboxRules, and an ErrorServerBusy fault with BackOffMilliseconds.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from auditd.config import EwsSource
from auditd.errors import SourceError
from auditd.model import Address, MailMessage
from auditd.sources.ews import forwarding_rules_ews, probe_ews, read_ews, sync_key
from auditd.sources.mailfile import MailStats
from tests.mail.ews_peer import MAILBOX, STATE1, STATE2, EwsPeer, M, T, serve, source


@pytest.fixture
def peer() -> Iterator[tuple[EwsPeer, str]]:
    with serve() as running:
        yield running


def _run(
    src: EwsSource, tmp_path: Path, previous: dict[str, str] | None = None
) -> tuple[list[MailMessage], list[dict[str, str]], dict[str, str]]:
    messages: list[MailMessage] = []
    updates: list[dict[str, str]] = []
    saved = dict(previous or {})
    for msg, upd in read_ews(src, base=tmp_path, previous=previous or {}, stats=MailStats()):
        if msg is not None:
            messages.append(msg)
        if upd:
            updates.append(upd)
            saved.update(upd)
    return messages, updates, saved


class TestSync:
    """SyncFolderItems pages become messages; the sync state is the checkpoint."""

    def test_first_sync_reads_new_mail_as_the_impersonated_mailbox(
        self, peer: tuple[EwsPeer, str], tmp_path: Path
    ) -> None:
        server, url = peer
        messages, updates, saved = _run(source(url, tmp_path), tmp_path)

        assert [m.subject for m in messages] == [
            "Trip to the Science Museum: permission slip",
            "Re: homework club",
            "Rota for next week",
        ]
        first = messages[0]
        assert first.source == "exchange"
        assert first.location == f"ews://{MAILBOX}/inbox/AAMkADEWS0001"
        assert first.message_id == "<a1b2c3d4e5f64a0b9c8d7e6f5a4b3c2d@EX01.choysez.local>"
        assert first.sender == Address("jane.smith@choysez.org.uk", "Jane Smith")
        assert first.to == (Address("grace.okafor@example.net", "Grace Okafor"),)
        assert first.cc == (Address("jane.smith77@gmail.com", "Jane Smith"),)
        assert first.date == dt.datetime(2026, 11, 20, 16, 2, 11, tzinfo=dt.UTC)
        assert "permission slip for Tom's trip" in first.text
        assert first.headers == (("X-MS-Exchange-Inbox-Rules-Loop", "jane.smith@choysez.org.uk"),)
        assert messages[1].reply_to == (Address("grace.okafor@example.net", "Grace"),)
        assert messages[1].sender == Address("grace.okafor@example.net", "Grace Okafor")
        # one checkpoint per page, the last one final
        assert updates == [{sync_key(MAILBOX, "inbox"): STATE1}, {sync_key(MAILBOX, "inbox"): STATE2}]
        assert saved == {sync_key(MAILBOX, "inbox"): STATE2}

        syncs = server.ops("SyncFolderItems")
        for call in syncs + server.ops("GetItem") + server.ops("GetFolder"):
            assert (
                call.envelope.findtext(f".//{T}ExchangeImpersonation/{T}ConnectingSID/{T}PrimarySmtpAddress")
                == MAILBOX
            )
        assert syncs[0].envelope.find(f".//{M}SyncState") is None
        assert syncs[1].envelope.findtext(f".//{M}SyncState") == STATE1
        # only the created messages are fetched, with a short field list including the text body
        get_items = server.ops("GetItem")
        assert [[e.get("Id") for e in c.envelope.iter(f"{T}ItemId")] for c in get_items] == [
            ["AAMkADEWS0001", "AAMkADEWS0002"],
            ["AAMkADEWS0003"],
        ]
        fields = {e.get("FieldURI") for e in get_items[0].envelope.iter(f"{T}FieldURI")}
        assert {"item:TextBody", "message:From", "message:InternetMessageId"} <= fields
        assert "item:InternetMessageHeaders" in fields
        assert "item:Body" not in fields and "item:Attachments" not in fields
        assert server.calls[0].headers["Authorization"].startswith("Basic ")

    def test_second_sync_replays_the_saved_state_and_finds_nothing(
        self, peer: tuple[EwsPeer, str], tmp_path: Path
    ) -> None:
        server, url = peer
        src = source(url, tmp_path)
        _, _, saved = _run(src, tmp_path)
        before = len(server.ops("SyncFolderItems"))

        messages, updates, _ = _run(src, tmp_path, saved)

        assert messages == [] and updates == []
        (again,) = server.ops("SyncFolderItems")[before:]
        assert again.envelope.findtext(f".//{M}SyncState") == STATE2
        assert len(server.ops("GetItem")) == 2  # one per page of the first sync, none the second time

    def test_a_sync_state_the_server_rejects_restarts_the_folder(
        self, peer: tuple[EwsPeer, str], tmp_path: Path
    ) -> None:
        server, url = peer
        key = sync_key(MAILBOX, "inbox")

        messages, updates, saved = _run(source(url, tmp_path), tmp_path, {key: "H4sIAAAAstale"})

        assert len(messages) == 3
        assert updates[0] == {key: ""}  # the rejected state is dropped first
        assert saved[key] == STATE2
        states = [c.envelope.findtext(f".//{M}SyncState") for c in server.ops("SyncFolderItems")]
        assert states == ["H4sIAAAAstale", None, STATE1]

    def test_a_server_busy_fault_is_retried_after_its_back_off(
        self, peer: tuple[EwsPeer, str], tmp_path: Path
    ) -> None:
        server, url = peer
        server.busy = 1
        started = time.monotonic()

        messages, _, _ = _run(source(url, tmp_path), tmp_path)

        assert time.monotonic() - started >= 1.0  # BackOffMilliseconds = 1000
        assert len(messages) == 3
        assert len(server.ops("SyncFolderItems")) == 3

    def test_a_back_off_beyond_the_bound_fails_the_source_with_one_line(
        self, peer: tuple[EwsPeer, str], tmp_path: Path
    ) -> None:
        server, url = peer
        server.busy = 5
        with pytest.raises(SourceError, match="throttled") as exc:
            _run(source(url, tmp_path, max_wait_seconds=0), tmp_path)
        assert exc.value.where == "exchange"
        assert "\n" not in str(exc.value)

    def test_an_unreadable_mailbox_does_not_stop_the_others(
        self, peer: tuple[EwsPeer, str], tmp_path: Path
    ) -> None:
        server, url = peer
        server.unknown_mailboxes = {"nobody@choysez.org.uk"}
        src = source(url, tmp_path, mailboxes=["nobody@choysez.org.uk", MAILBOX])
        messages: list[MailMessage] = []

        def consume() -> None:
            for msg, _ in read_ews(src, base=tmp_path, previous={}, stats=MailStats()):
                if msg is not None:
                    messages.append(msg)

        with pytest.raises(
            SourceError, match=r"1 folder\(s\) unreadable; first: nobody@choysez.org.uk/inbox: "
        ):
            consume()
        assert len(messages) == 3


class TestRulesAndProbe:
    """Inbox rules that forward become ForwardingRules; the probe opens each folder."""

    def test_forward_rule_to_gmail_becomes_a_forwarding_rule(
        self, peer: tuple[EwsPeer, str], tmp_path: Path
    ) -> None:
        server, url = peer
        now = dt.datetime(2026, 11, 24, 9, 0, tzinfo=dt.UTC)

        rules = forwarding_rules_ews(source(url, tmp_path), base=tmp_path, now=now)

        assert [(r.name, r.targets, r.action, r.enabled, r.mailbox) for r in rules] == [
            ("Everything to my gmail", ("jane.smith77@gmail.com",), "forward", True, MAILBOX)
        ]
        (call,) = server.ops("GetInboxRules")
        assert call.envelope.findtext(f".//{M}MailboxSmtpAddress") == MAILBOX

    def test_probe_opens_the_folders(self, peer: tuple[EwsPeer, str], tmp_path: Path) -> None:
        server, url = peer
        probe_ews(source(url, tmp_path, folders=["inbox", "sent"]), tmp_path)
        asked = {
            e.get("Id") for c in server.ops("GetFolder") for e in c.envelope.iter(f"{T}DistinguishedFolderId")
        }
        assert {"inbox", "sentitems"} <= asked
