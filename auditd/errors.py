"""One exception tree for the whole package.

Each error carries what a person needs to act on it (file, key, line, source name) and renders
as one line. The CLI maps `exit_code` to the process exit status.
"""

from __future__ import annotations


class AuditError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, where: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class ConfigError(AuditError):
    """Invalid configuration, policy or directory file; `where` names the file and key or line."""

    exit_code = 2


class InputError(AuditError):
    """An input file that cannot be read as what it should be."""

    exit_code = 2


class UsageError(AuditError):
    """A command-line request that cannot be honoured as given (bad subject, unknown id...)."""

    exit_code = 2


class PermissionDenied(AuditError):
    """The named person may not do this (for example approve without being centre manager)."""

    exit_code = 2


class SourceError(AuditError):
    """A source that cannot be read (unreachable server, bad password, missing folder)."""


class StoreError(AuditError):
    """The findings store cannot be opened or written."""


class DeliveryError(AuditError):
    """A digest that could not be delivered."""
