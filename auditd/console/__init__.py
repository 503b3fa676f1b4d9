"""The review console in the browser (`choysez-auditd console`); `serve_console` is what `run` calls."""

from auditd.console.app import create_app, serve_console

__all__ = ["create_app", "serve_console"]
