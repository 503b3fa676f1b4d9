"""Exchange on premises through EWS (exchangelib): impersonated mailboxes, SyncFolderItems, inbox rules.

exchangelib is untyped, so all of it stays in this adapter. Reading is read-only: SyncFolderItems
and GetItem never mark mail as read. Each folder's sync state is the checkpoint
("sync:MAILBOX:FOLDER"), saved after every page, so a pass resumes where the last one stopped; a
sync state the server no longer accepts restarts that folder from scratch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import requests.adapters

from auditd.config import EwsSource, read_secret
from auditd.errors import SourceError
from auditd.model import Address, ForwardingRule, MailMessage
from auditd.sources.mailfile import KEPT_HEADERS, TEXT_CAP, MailStats, html_to_text

log = logging.getLogger(__name__)

PAGE = 100  # changes per SyncFolderItems request (exchangelib's default, Exchange allows 512)
FIELDS = (
    "message_id",
    "datetime_sent",
    "datetime_received",
    "author",
    "sender",
    "to_recipients",
    "cc_recipients",
    "bcc_recipients",
    "reply_to",
    "subject",
    "headers",
)
# config folder name -> exchangelib Account attribute of the distinguished folder
DISTINGUISHED = {
    "inbox": "inbox",
    "sent": "sent",
    "sentitems": "sent",
    "drafts": "drafts",
    "junk": "junk",
    "junkemail": "junk",
    "deleteditems": "trash",
    "outbox": "outbox",
}
RULE_ACTIONS = (
    ("forward_to_recipients", "forward"),
    ("forward_as_attachment_to_recipients", "forward-as-attachment"),
    ("redirect_to_recipients", "redirect"),
)

Updates = dict[str, str]

_CA_FILES: dict[str, str] = {}  # host name -> PEM bundle, for the adapter below


class _CAAdapter(requests.adapters.HTTPAdapter):
    """Trusts a source's `ca_file` for its host (exchangelib builds its own sessions)."""

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        host = urlsplit(url).hostname or ""
        super().cert_verify(conn, url, _CA_FILES.get(host, verify), cert)


@functools.cache
def _sync_service() -> Any:
    """exchangelib's SyncFolderItems, reading an error answer as the error it is.

    exchangelib 5.6 reads SyncState before ResponseClass, so ErrorInvalidSyncStateData (which has
    no SyncState) would surface as an AttributeError instead.
    """
    from exchangelib.services import SyncFolderItems
    from exchangelib.services.sync_folder_hierarchy import SyncFolder

    class Sync(SyncFolderItems):  # type: ignore[misc]
        def _get_element_container(self, message: Any, name: Any = None) -> Any:
            if message.get("ResponseClass") != "Success":
                return super(SyncFolder, self)._get_element_container(message=message, name=name)
            return super()._get_element_container(message=message, name=name)

    return Sync


def sync_key(mailbox: str, folder: str) -> str:
    return f"sync:{mailbox}:{folder}"


def _config(src: EwsSource, base: Path) -> Any:
    from exchangelib import BASIC, NTLM, Configuration, Credentials, FaultTolerance
    from exchangelib.protocol import BaseProtocol

    password = read_secret(src.password_file, base, "password_file")
    if src.ca_file is not None:
        _CA_FILES[urlsplit(src.endpoint).hostname or ""] = str(src.ca_file)
        BaseProtocol.HTTP_ADAPTER_CLS = _CAAdapter
    return Configuration(
        service_endpoint=src.endpoint,
        credentials=Credentials(src.username, password),
        auth_type=NTLM if src.auth == "ntlm" else BASIC,
        # ErrorServerBusy carries BackOffMilliseconds: wait that long, but not past the bound
        retry_policy=FaultTolerance(max_wait=src.max_wait_seconds),
        max_connections=2,
    )


def _account(src: EwsSource, config: Any, mailbox: str) -> Any:
    from exchangelib import DELEGATE, IMPERSONATION, Account
    from exchangelib import UTC as EWS_UTC

    return Account(
        primary_smtp_address=mailbox,
        config=config,
        autodiscover=False,
        access_type=IMPERSONATION if src.impersonation else DELEGATE,
        default_timezone=EWS_UTC,
        locale="en_GB",
    )


def _folder(account: Any, name: str) -> Any:
    """A distinguished folder by its well-known name, else a path below the message root ("inbox/Parents")."""
    parts = [p for p in name.split("/") if p]
    if not parts:
        raise SourceError(f"empty folder name {name!r}")
    head = parts[0].lower()
    if head in DISTINGUISHED:
        folder = getattr(account, DISTINGUISHED[head])
    else:
        folder = account.msg_folder_root / parts[0]
    for part in parts[1:]:
        folder = folder / part
    return folder


def _is_whole_source(exc: BaseException) -> bool:
    """Failures that would repeat for every mailbox: credentials, the server, throttling past the bound."""
    from exchangelib.errors import (
        CASError,
        RateLimitError,
        ResponseMessageError,
        TransportError,
        UnauthorizedError,
    )

    if isinstance(exc, UnauthorizedError | CASError | RateLimitError | requests.RequestException):
        return True
    return isinstance(exc, TransportError) and not isinstance(exc, ResponseMessageError)


def _reason(exc: BaseException) -> str:
    from exchangelib.errors import RateLimitError, UnauthorizedError

    if isinstance(exc, UnauthorizedError):
        return "the server refused the username or password"
    if isinstance(exc, RateLimitError):
        return f"throttled (ErrorServerBusy) for longer than max_wait_seconds: {exc}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def _when(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return datetime.fromtimestamp(value.timestamp(), tz=UTC)


def _address(mb: Any) -> Address | None:
    email = str(getattr(mb, "email_address", "") or "").strip().lower()
    if "@" not in email:
        return None  # an EX (legacyExchangeDN) address that did not resolve to SMTP
    return Address(email, str(getattr(mb, "name", "") or "").strip())


def _addresses(values: Any) -> tuple[Address, ...]:
    return tuple(a for v in values or () if (a := _address(v)) is not None)


def to_message(item: Any, *, source: str, mailbox: str, folder: str) -> MailMessage:
    """An exchangelib Message as a MailMessage (bcc, known only on sent mail, joins cc)."""
    text = getattr(item, "text_body", None)
    if text is None:
        body = getattr(item, "body", None)  # Exchange 2010: no TextBody
        text = html_to_text(str(body)) if body is not None and type(body).__name__ == "HTMLBody" else body
    headers = tuple(
        (str(h.name), str(h.value or ""))
        for h in getattr(item, "headers", None) or ()
        if str(getattr(h, "name", "")).lower() in KEPT_HEADERS
    )
    sender = _address(getattr(item, "author", None)) or _address(getattr(item, "sender", None))
    return MailMessage(
        source=source,
        location=f"ews://{mailbox}/{folder}/{item.id}",
        message_id=str(item.message_id or "").strip() or None,
        date=_when(item.datetime_sent) or _when(item.datetime_received),
        sender=sender,
        to=_addresses(item.to_recipients),
        cc=_addresses(item.cc_recipients) + _addresses(item.bcc_recipients),
        reply_to=_addresses(item.reply_to),
        subject=str(item.subject or "").strip(),
        text=str(text or "")[:TEXT_CAP],
        headers=headers,
    )


def _folder_messages(
    src: EwsSource, account: Any, mailbox: str, name: str, start: str | None, stats: MailStats
) -> Iterator[tuple[MailMessage | None, Updates]]:
    from exchangelib import Message
    from exchangelib.errors import ErrorInvalidSyncStateData, ErrorItemNotFound
    from exchangelib.services import SyncFolderItems
    from exchangelib.version import EXCHANGE_2013

    service = _sync_service()
    key = sync_key(mailbox, name)
    folder = _folder(account, name)
    fields = [*FIELDS, "text_body" if account.version.build >= EXCHANGE_2013 else "body"]
    state = start
    restarted = False
    while True:
        svc = service(account=account)
        created: list[Any] = []
        try:
            for change in svc.call(
                folder=folder,
                shape="IdOnly",
                additional_fields=set(),
                sync_state=state,
                ignore=None,
                max_changes_returned=PAGE,
                sync_scope="NormalItems",
            ):
                if isinstance(change, Exception):
                    raise change
                change_type, item = change
                # updates are flag and read-state changes of mail already seen; deletions need nothing
                if change_type == SyncFolderItems.CREATE and isinstance(item, Message):
                    created.append(item)
        except ErrorInvalidSyncStateData:
            if restarted or state is None:
                raise
            restarted, state = True, None
            yield None, {key: ""}
            continue
        for item in account.fetch(ids=created, folder=folder, only_fields=fields) if created else ():
            if isinstance(item, ErrorItemNotFound):
                continue  # deleted between the sync and the fetch
            stats.messages += 1
            if isinstance(item, Exception):
                stats.problem(f"ews://{mailbox}/{name}: {type(item).__name__}: {item}")
                continue
            try:
                msg = to_message(item, source=src.name, mailbox=mailbox, folder=name)
            except (TypeError, ValueError, AttributeError) as exc:
                stats.problem(f"ews://{mailbox}/{name}/{item.id}: {type(exc).__name__}: {exc}")
                continue
            yield msg, {}
        new_state = svc.sync_state
        if new_state and new_state != state:
            yield None, {key: new_state}
        if svc.includes_last_item_in_range or not new_state or new_state == state:
            return
        state = new_state


def read_ews(
    src: EwsSource, *, base: Path, previous: Mapping[str, str], stats: MailStats
) -> Iterator[tuple[MailMessage | None, Updates]]:
    """New messages of every configured mailbox and folder, with checkpoint updates.

    Yields `(message, {})` for each message and `(None, updates)` after each SyncFolderItems page:
    the pipeline saves `updates` once everything before is committed. A mailbox that cannot be read
    (not found, impersonation denied, missing folder) does not stop the others; the pass then ends
    with one SourceError naming them. Credential and connection failures end the pass at once.
    """
    from exchangelib.errors import EWSError

    config = _config(src, base)
    failed: list[str] = []
    for mailbox in src.mailboxes:
        try:
            account = _account(src, config, mailbox)
            for name in src.folders:
                try:
                    yield from _folder_messages(
                        src, account, mailbox, name, previous.get(sync_key(mailbox, name)) or None, stats
                    )
                except (EWSError, requests.RequestException) as exc:
                    if _is_whole_source(exc):
                        raise
                    failed.append(f"{mailbox}/{name}: {_reason(exc)}")
                except SourceError as exc:
                    failed.append(f"{mailbox}/{name}: {exc.message}")
        except (EWSError, requests.RequestException) as exc:
            raise SourceError(f"{src.endpoint}: {_reason(exc)}", where=src.name) from None
    if failed:
        raise SourceError(f"{len(failed)} folder(s) unreadable; first: {failed[0]}", where=src.name)


def forwarding_rules_ews(src: EwsSource, *, base: Path, now: datetime) -> list[ForwardingRule]:
    """Inbox rules that forward or redirect, per mailbox (GetInboxRules, Exchange 2010 SP1 and later).

    The mailbox-level forwarding setting (ForwardingSmtpAddress / ForwardingAddress) is not exposed
    by EWS; only the Exchange Management Shell (Get-Mailbox) shows it.
    """
    from exchangelib.errors import EWSError

    config = _config(src, base)
    rules: list[ForwardingRule] = []
    for mailbox in src.mailboxes:
        try:
            found = _account(src, config, mailbox).rules
        except (EWSError, requests.RequestException) as exc:
            raise SourceError(f"inbox rules of {mailbox}: {_reason(exc)}", where=src.name) from None
        for rule in found:
            if isinstance(rule, Exception) or rule.actions is None:
                continue
            for attr, action in RULE_ACTIONS:
                targets = tuple(a.email for a in _addresses(getattr(rule.actions, attr, None)))
                if targets:
                    rules.append(
                        ForwardingRule(
                            source=src.name,
                            mailbox=mailbox,
                            name=str(rule.display_name or rule.id or ""),
                            targets=targets,
                            enabled=bool(rule.is_enabled) if rule.is_enabled is not None else True,
                            seen_at=now,
                            action=action,
                        )
                    )
    return rules


def probe_ews(src: EwsSource, base: Path) -> None:
    """Check the credentials and that every mailbox's folders open; raise SourceError if not."""
    from exchangelib.errors import EWSError

    config = _config(src, base)
    for mailbox in src.mailboxes:
        try:
            account = _account(src, config, mailbox)
            for name in src.folders:
                _folder(account, name)
        except (EWSError, requests.RequestException) as exc:
            raise SourceError(f"{mailbox}: {_reason(exc)}", where=src.name) from None


class EwsMailbox:
    """An EWS source as a `MailSource` (see `read_ews`; checkpoints `sync:MAILBOX:FOLDER`)."""

    def __init__(self, src: EwsSource, base: Path) -> None:
        self.src = src
        self.name = src.name
        self.base = base

    def read(
        self, previous: Mapping[str, str], stats: MailStats
    ) -> Iterator[tuple[MailMessage | None, Updates]]:
        return read_ews(self.src, base=self.base, previous=previous, stats=stats)

    def probe(self) -> None:
        probe_ews(self.src, self.base)

    def forwarding_rules(self, now: datetime) -> list[ForwardingRule]:
        return forwarding_rules_ews(self.src, base=self.base, now=now)
