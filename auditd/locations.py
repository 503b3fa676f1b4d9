"""Where the config file is looked for; apart from `auditd.config` so that finding it needs no
validation library (a command that runs without a config starts faster)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CONFIG = Path("/etc/choysez-auditd/config.toml")
ENV_CONFIG = "CHOYSEZ_AUDITD_CONFIG"


def config_path(explicit: str | None) -> Path:
    """`--config` if given, else `$CHOYSEZ_AUDITD_CONFIG`, else /etc/choysez-auditd/config.toml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_CONFIG)
    return Path(env) if env else DEFAULT_CONFIG
