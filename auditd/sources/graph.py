"""Exchange Online through Microsoft Graph: app-only access, per-folder delta queries, inbox rules.

Read-only: only GET requests, so nothing is marked as read. Each folder's `@odata.nextLink` or
`@odata.deltaLink` is the checkpoint ("delta:MAILBOX:FOLDER"): a pass resumes where the last one
stopped, and a stale link (410 Gone) restarts that folder from scratch. Delta rounds also return
messages that were only updated (read, flagged); the store's fingerprints make seeing one again
harmless.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import msal
import requests

from auditd.config import GraphSource, read_secret
from auditd.errors import AuditError, SourceError
from auditd.model import Address, ForwardingRule, MailMessage
from auditd.sources.mailfile import KEPT_HEADERS, TEXT_CAP, MailStats

SELECT = ",".join(
    (
        "internetMessageId",
        "internetMessageHeaders",
        "from",
        "sender",
        "toRecipients",
        "ccRecipients",
        "bccRecipients",
        "replyTo",
        "subject",
        "receivedDateTime",
        "sentDateTime",
        "body",
    )
)
PAGE_SIZE = 50  # Prefer: odata.maxpagesize; bodies make pages heavy
TIMEOUT = 60.0
MAX_ATTEMPTS = 6
RETRIED = frozenset({429, 502, 503, 504})
RULE_ACTIONS = (
    ("forwardTo", "forward"),
    ("forwardAsAttachmentTo", "forward-as-attachment"),
    ("redirectTo", "redirect"),
)

Updates = dict[str, str]
Sleep = Callable[[float], None]


def delta_key(mailbox: str, folder: str) -> str:
    return f"delta:{mailbox}:{folder}"


class _Gone(Exception):
    """A delta or skip token the service no longer knows (410 Gone): start the folder again."""


class _Session(requests.Session):
    """A session that trusts `ca_file` even when REQUESTS_CA_BUNDLE is set.

    requests lets that variable override `Session.verify`, and msal calls the session without
    `verify=`, so the CA file is applied per request here.
    """

    def __init__(self, ca_file: str | None) -> None:
        super().__init__()
        self.ca_file = ca_file

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        if self.ca_file is not None and kwargs.get("verify") in (None, True):
            kwargs["verify"] = self.ca_file
        verb = method.decode() if isinstance(method, bytes) else method
        return super().request(verb, url, *args, **kwargs)


class GraphClient:
    """GET requests to Graph with an app-only token, honouring Retry-After within a bound."""

    def __init__(self, src: GraphSource, base: Path, *, sleep: Sleep = time.sleep) -> None:
        self.src = src
        self.sleep = sleep
        self.session = _Session(str(src.ca_file) if src.ca_file is not None else None)
        self.session.headers["User-Agent"] = "choysez-auditd"
        origin = urlsplit(src.graph_url)
        self.scope = f"{origin.scheme}://{origin.netloc}/.default"
        try:
            self.app = msal.ConfidentialClientApplication(
                src.client_id,
                client_credential=_credential(src, base),
                authority=src.authority_url,
                http_client=self.session,
                # the authority is the admin's to choose (sovereign clouds); no lookup on the public cloud
                instance_discovery=False,
                validate_authority=False,
            )
        except (ValueError, requests.RequestException) as exc:
            raise SourceError(f"cannot reach the authority {src.authority_url}: {_first_line(exc)}") from None

    def close(self) -> None:
        self.session.close()

    def token(self) -> str:
        """A token for the Graph scope; msal caches it and renews it when it nears expiry."""
        try:
            result = self.app.acquire_token_for_client(scopes=[self.scope])
        except (ValueError, requests.RequestException) as exc:
            raise SourceError(f"cannot get a token: {_first_line(exc)}") from None
        if not isinstance(result, dict) or "access_token" not in result:
            err = result if isinstance(result, dict) else {}
            reason = str(err.get("error_description") or err.get("error") or "no token in the answer")
            raise SourceError(f"cannot get a token: {_aad_reason(reason)}")
        return str(result["access_token"])

    def get(self, url: str, *, prefer: tuple[str, ...] = ()) -> dict[str, Any]:
        """GET a JSON object; 429/503 wait as told (Retry-After) as long as the total stays bounded."""
        waited = 0.0
        for attempt in range(MAX_ATTEMPTS):
            headers = {"Authorization": f"Bearer {self.token()}", "Accept": "application/json"}
            if prefer:
                headers["Prefer"] = ", ".join(prefer)
            try:
                resp = self.session.get(url, headers=headers, timeout=TIMEOUT)
            except requests.RequestException as exc:
                raise SourceError(f"cannot reach {_origin(url)}: {_first_line(exc)}") from None
            if resp.status_code == 200:
                try:
                    body = resp.json()
                except ValueError:
                    raise SourceError(f"{_origin(url)} answered with something that is not JSON") from None
                if not isinstance(body, dict):
                    raise SourceError(f"{_origin(url)} answered with JSON that is not an object")
                return body
            if resp.status_code == 410:
                raise _Gone()
            if resp.status_code in RETRIED and attempt + 1 < MAX_ATTEMPTS:
                wait = _retry_after(resp.headers.get("Retry-After"), default=2.0**attempt)
                if waited + wait > self.src.max_wait_seconds:
                    raise SourceError(
                        f"throttled by {_origin(url)} (HTTP {resp.status_code}, Retry-After {wait:g} s): "
                        f"more than max_wait_seconds = {self.src.max_wait_seconds}"
                    )
                self.sleep(wait)
                waited += wait
                continue
            raise SourceError(f"HTTP {resp.status_code} from {_strip_query(url)}: {_graph_error(resp)}")
        raise SourceError(f"still throttled by {_origin(url)} after {MAX_ATTEMPTS} attempts")


def _credential(src: GraphSource, base: Path) -> str | dict[str, str]:
    if src.client_secret_file is not None:
        return read_secret(src.client_secret_file, base, "client_secret_file")
    assert src.certificate_file is not None  # the config requires one of the two
    pem = read_secret(src.certificate_file, base, "certificate_file")
    return certificate_credential(pem, where=str(src.certificate_file))


def certificate_credential(pem: str, *, where: str, setting: str = "certificate_file") -> dict[str, str]:
    """msal's certificate credential from one PEM holding the certificate and its private key.

    The thumbprint Entra ID matches against the app registration is the certificate's SHA-1 digest.
    msal signs its client assertion with RS256 only: another key type is refused here, in one line,
    rather than deep inside msal.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    data = pem.encode()
    try:
        cert = x509.load_pem_x509_certificate(data)
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise SourceError(
            f"{setting} {where}: needs a PEM certificate and an unencrypted private key ({exc})"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SourceError(f"{setting} {where}: the private key must be RSA (Entra ID uses RS256)")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return {"private_key": key_pem, "thumbprint": cert.fingerprint(hashes.SHA1()).hex().upper()}  # noqa: S303


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _aad_reason(description: str) -> str:
    """'AADSTS7000215: Invalid client secret provided. Ensure...\\r\\nTrace ID: ...' -> its first sentence."""
    first = description.strip().splitlines()[0] if description.strip() else description
    code, colon, rest = first.partition(":")
    if colon and code.startswith("AADSTS"):
        sentence = rest.strip().split(". ")[0].rstrip(".")
        return f"{code} {sentence[:1].lower()}{sentence[1:]}"
    return first[:300]


def _retry_after(value: str | None, *, default: float) -> float:
    if value is None:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        return default


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _strip_query(url: str) -> str:
    return url.split("?", 1)[0]


def _graph_error(resp: requests.Response) -> str:
    try:
        err = resp.json().get("error", {})
        return f"{err.get('code', '')}: {err.get('message', '')}".strip(": ")[:300] or resp.reason
    except (ValueError, AttributeError):
        return str(resp.reason)


# ---- messages -------------------------------------------------------------------------------------


def _address(obj: object) -> Address | None:
    if not isinstance(obj, dict):
        return None
    ea = obj.get("emailAddress")
    if not isinstance(ea, dict):
        return None
    addr = str(ea.get("address") or "").strip().lower()
    if "@" not in addr:
        return None
    return Address(addr, str(ea.get("name") or "").strip())


def _addresses(values: object) -> tuple[Address, ...]:
    if not isinstance(values, list):
        return ()
    return tuple(a for v in values if (a := _address(v)) is not None)


def _when(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def to_message(item: Mapping[str, Any], *, source: str, mailbox: str, folder: str) -> MailMessage:
    """A Graph `message` resource as a MailMessage (bcc, known only on sent mail, joins cc)."""
    raw_body = item.get("body")
    body: Mapping[str, Any] = raw_body if isinstance(raw_body, dict) else {}
    text = str(body.get("content") or "")[:TEXT_CAP]
    if str(body.get("contentType", "")).lower() == "html":  # the Prefer header was not honoured
        from auditd.sources.mailfile import html_to_text

        text = html_to_text(text)[:TEXT_CAP]
    headers_raw = item.get("internetMessageHeaders")
    headers = tuple(
        (str(h.get("name")), str(h.get("value") or ""))
        for h in (headers_raw if isinstance(headers_raw, list) else [])
        if isinstance(h, dict) and str(h.get("name", "")).lower() in KEPT_HEADERS
    )
    sender = _address(item.get("from")) or _address(item.get("sender"))
    return MailMessage(
        source=source,
        location=f"graph://{mailbox}/{folder}/{item.get('id', '')}",
        message_id=str(item.get("internetMessageId") or "").strip() or None,
        date=_when(item.get("sentDateTime")) or _when(item.get("receivedDateTime")),
        sender=sender,
        to=_addresses(item.get("toRecipients")),
        cc=_addresses(item.get("ccRecipients")) + _addresses(item.get("bccRecipients")),
        reply_to=_addresses(item.get("replyTo")),
        subject=str(item.get("subject") or "").strip(),
        text=text,
        headers=headers,
    )


def _first_url(graph_url: str, mailbox: str, folder: str) -> str:
    return (
        f"{graph_url.rstrip('/')}/users/{quote(mailbox, safe='@')}/mailFolders/{quote(folder, safe='')}"
        f"/messages/delta?$select={SELECT}"
    )


def _folder_messages(
    client: GraphClient, mailbox: str, folder: str, start: str | None, stats: MailStats
) -> Iterator[tuple[MailMessage | None, Updates]]:
    key = delta_key(mailbox, folder)
    url = start or _first_url(client.src.graph_url, mailbox, folder)
    restarted = False
    prefer = (f"odata.maxpagesize={PAGE_SIZE}", 'outlook.body-content-type="text"')
    while True:
        try:
            page = client.get(url, prefer=prefer)
        except _Gone:
            if restarted:
                raise SourceError(f"{mailbox}/{folder}: the delta query answered 410 Gone twice") from None
            restarted = True
            url = _first_url(client.src.graph_url, mailbox, folder)
            yield None, {key: ""}  # forget the stale link even if this round fails part way
            continue
        values = page.get("value")
        for item in values if isinstance(values, list) else []:
            if not isinstance(item, dict) or "@removed" in item:
                continue  # a deletion or a move out of the folder: nothing to audit
            stats.messages += 1
            try:
                msg = to_message(item, source=client.src.name, mailbox=mailbox, folder=folder)
            except (TypeError, ValueError, AttributeError) as exc:
                where = f"graph://{mailbox}/{folder}/{item.get('id', '?')}"
                stats.problem(f"{where}: {type(exc).__name__}: {exc}")
                continue
            yield msg, {}
        next_link = page.get("@odata.nextLink")
        delta_link = page.get("@odata.deltaLink")
        if isinstance(next_link, str) and next_link:
            # a skip token resumes this round part way, so a first sync of a big mailbox is not lost
            yield None, {key: next_link}
            url = next_link
        elif isinstance(delta_link, str) and delta_link:
            yield None, {key: delta_link}
            return
        else:
            raise SourceError(f"{mailbox}/{folder}: a delta page with neither nextLink nor deltaLink")


def read_graph(
    src: GraphSource, *, base: Path, previous: Mapping[str, str], stats: MailStats
) -> Iterator[tuple[MailMessage | None, Updates]]:
    """New messages of every configured mailbox and folder, with checkpoint updates.

    Yields `(message, {})` for each message and `(None, updates)` whenever a checkpoint may
    advance (after each page): the pipeline saves `updates` once everything before is committed.
    A mailbox that cannot be read does not stop the others; the pass then ends with one
    SourceError naming them. Token and connection failures end the pass at once.
    """
    client = _client(src, base)
    failed: list[str] = []
    try:
        for mailbox in src.mailboxes:
            for folder in src.folders:
                start = previous.get(delta_key(mailbox, folder)) or None
                try:
                    yield from _folder_messages(client, mailbox, folder, start, stats)
                except SourceError as exc:
                    if _whole_source(exc):
                        raise SourceError(exc.message, where=src.name) from None
                    failed.append(f"{mailbox}/{folder}: {exc.message}")
    finally:
        client.close()
    if failed:
        raise SourceError(f"{len(failed)} folder(s) unreadable; first: {failed[0]}", where=src.name)


def _client(src: GraphSource, base: Path) -> GraphClient:
    try:
        return GraphClient(src, base)
    except SourceError as exc:
        raise SourceError(exc.message, where=src.name) from None


def _whole_source(exc: AuditError) -> bool:
    msg = exc.message
    return msg.startswith(("cannot get a token", "cannot reach", "throttled", "still throttled", "HTTP 401"))


def forwarding_rules_graph(src: GraphSource, *, base: Path, now: datetime) -> list[ForwardingRule]:
    """Inbox rules that forward or redirect, per mailbox (needs MailboxSettings.Read).

    The mailbox-level forwarding setting (`ForwardingSmtpAddress`, set by an admin or in OWA) is
    not exposed by Graph v1.0; only Exchange Online PowerShell (Get-Mailbox) shows it.
    """
    client = _client(src, base)
    rules: list[ForwardingRule] = []
    try:
        for mailbox in src.mailboxes:
            user = quote(mailbox, safe="@")
            url = f"{src.graph_url.rstrip('/')}/users/{user}/mailFolders/inbox/messageRules"
            while url:
                page = client.get(url)
                for rule in page.get("value") or []:
                    if isinstance(rule, dict):
                        rules.extend(_forwarding(rule, source=src.name, mailbox=mailbox, now=now))
                nxt = page.get("@odata.nextLink")
                url = nxt if isinstance(nxt, str) else ""
    except _Gone:
        raise SourceError("inbox rules: HTTP 410 Gone", where=src.name) from None
    except SourceError as exc:
        raise SourceError(f"inbox rules: {exc.message}", where=src.name) from None
    finally:
        client.close()
    return rules


def _forwarding(rule: Mapping[str, Any], *, source: str, mailbox: str, now: datetime) -> list[ForwardingRule]:
    raw = rule.get("actions")
    actions: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
    out = []
    for field, action in RULE_ACTIONS:
        targets = tuple(a.email for a in _addresses(actions.get(field)))
        if targets:
            out.append(
                ForwardingRule(
                    source=source,
                    mailbox=mailbox,
                    name=str(rule.get("displayName") or rule.get("id") or ""),
                    targets=targets,
                    enabled=bool(rule.get("isEnabled", True)),
                    seen_at=now,
                    action=action,
                )
            )
    return out


def probe_graph(src: GraphSource, base: Path) -> None:
    """Check the credentials and each mailbox's folders answer; raise SourceError if not."""
    client = _client(src, base)
    try:
        for mailbox in src.mailboxes:
            for folder in src.folders:
                url = (
                    f"{src.graph_url.rstrip('/')}/users/{quote(mailbox, safe='@')}/mailFolders/"
                    f"{quote(folder, safe='')}?$select=id,displayName"
                )
                try:
                    client.get(url)
                except SourceError as exc:
                    raise SourceError(f"{mailbox}/{folder}: {exc.message}", where=src.name) from None
    except _Gone:
        raise SourceError("HTTP 410 Gone", where=src.name) from None
    finally:
        client.close()


class GraphMailbox:
    """A Microsoft Graph source as a `MailSource` (see `read_graph`; checkpoints `delta:MAILBOX:FOLDER`)."""

    def __init__(self, src: GraphSource, base: Path) -> None:
        self.src = src
        self.name = src.name
        self.base = base

    def read(
        self, previous: Mapping[str, str], stats: MailStats
    ) -> Iterator[tuple[MailMessage | None, Updates]]:
        return read_graph(self.src, base=self.base, previous=previous, stats=stats)

    def probe(self) -> None:
        probe_graph(self.src, self.base)

    def forwarding_rules(self, now: datetime) -> list[ForwardingRule]:
        return forwarding_rules_graph(self.src, base=self.base, now=now)
