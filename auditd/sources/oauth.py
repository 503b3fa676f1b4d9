"""App-only OAuth tokens from Entra ID (the client-credentials flow), for XOAUTH2 logins to IMAP.

Exchange Online accepts IMAP logins from an app registration whose service principal was granted
access to the mailbox (`Add-MailboxPermission`); the token is asked for the scope
`https://outlook.office365.com/.default` and the IMAP user name is the mailbox address. The
credential is a client secret or a certificate, as for the Graph source, whose helpers this reuses
so both sources speak to Entra ID the same way (a CA file honoured, errors cut to the AADSTS code).
"""

from __future__ import annotations

from pathlib import Path

import msal
import requests

from auditd.config import ImapSource, read_secret
from auditd.errors import SourceError
from auditd.sources.graph import _aad_reason, _first_line, _Session, certificate_credential


class ClientCredentials:
    """Tokens for one app and one scope; msal caches a token and renews it when it nears expiry.

    Made once per pass: building it reads the authority's OpenID configuration, so an unreachable
    authority is a SourceError here, not at the first login.
    """

    def __init__(
        self,
        *,
        client_id: str,
        credential: str | dict[str, str],
        authority: str,
        scope: str,
        ca_file: Path | None = None,
    ) -> None:
        self.scope = scope
        self.authority = authority
        self.session = _Session(str(ca_file) if ca_file is not None else None)
        self.session.headers["User-Agent"] = "choysez-auditd"
        try:
            self.app = msal.ConfidentialClientApplication(
                client_id,
                client_credential=credential,
                authority=authority,
                http_client=self.session,
                # the authority is the admin's to choose (sovereign clouds); no lookup on the public cloud
                instance_discovery=False,
                validate_authority=False,
            )
        except (ValueError, requests.RequestException) as exc:
            self.session.close()
            raise SourceError(f"cannot reach the authority {authority}: {_first_line(exc)}") from None

    def token(self) -> str:
        """An access token for the scope: from msal's cache while it is fresh, else a new one."""
        try:
            result = self.app.acquire_token_for_client(scopes=[self.scope])
        except (ValueError, requests.RequestException) as exc:
            raise SourceError(f"cannot get a token from {self.authority}: {_first_line(exc)}") from None
        if not isinstance(result, dict) or "access_token" not in result:
            err = result if isinstance(result, dict) else {}
            reason = str(err.get("error_description") or err.get("error") or "no token in the answer")
            raise SourceError(f"cannot get a token: {_aad_reason(reason)}")
        return str(result["access_token"])

    def close(self) -> None:
        self.session.close()


def imap_credentials(src: ImapSource, base: Path) -> ClientCredentials:
    """The client-credentials flow an IMAP source is configured for (`oauth_client_id` is set)."""
    assert src.oauth_client_id is not None  # the caller checks; the config insists on the rest
    if src.oauth_client_secret_file is not None:
        credential: str | dict[str, str] = read_secret(
            src.oauth_client_secret_file, base, "oauth_client_secret_file"
        )
    else:
        assert src.oauth_certificate_file is not None
        pem = read_secret(src.oauth_certificate_file, base, "oauth_certificate_file")
        credential = certificate_credential(
            pem, where=str(src.oauth_certificate_file), setting="oauth_certificate_file"
        )
    return ClientCredentials(
        client_id=src.oauth_client_id,
        credential=credential,
        authority=src.oauth_authority_url,
        scope=src.oauth_scope,
        ca_file=src.oauth_ca_file,
    )
