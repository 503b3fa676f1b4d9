"""Structured logs for the daemon: one JSON object a line on stdout (journald keeps them as they are).

Context (`source`, `job`, `run_id`) is bound with `structlog.contextvars`, so every line a job
writes names the job and its run. Libraries that log through the standard `logging` module
(APScheduler) come out as the same JSON lines.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def _lead_keys(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Time, level and event first, so a line reads left to right."""
    first = {k: event.pop(k) for k in ("timestamp", "level", "event") if k in event}
    return {**first, **event}


def configure(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Send structlog and standard-library logging to `stream` (stdout) as JSON lines."""
    out = stream or sys.stdout
    structlog.configure(
        processors=[
            *_SHARED,
            structlog.processors.format_exc_info,
            _lead_keys,
            structlog.processors.JSONRenderer(ensure_ascii=False, sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_SHARED, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(ensure_ascii=False),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # APScheduler says "Running job ..." for every run at INFO: our own lines say it better.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def get_logger(**bound: Any) -> Any:
    """A structlog logger with `bound` values on every line."""
    return structlog.get_logger("choysez-auditd").bind(**bound)
