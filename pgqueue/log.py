"""structlog helpers. The library only asks for loggers; the CLI configures."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def get_logger(**bound: Any) -> Any:
    """pgqueue's logger, with ``bound`` keys on every event."""
    return structlog.get_logger("pgqueue").bind(**bound)


def is_info_enabled(logger: Any) -> bool:
    """Whether ``logger`` keeps info events (True when it cannot tell).

    The worker asks once and skips building per-job info events when they
    would be dropped: a few microseconds a job at tens of thousands a second.
    """
    check = getattr(logger, "is_enabled_for", None)
    return True if check is None else bool(check(logging.INFO))


def configure(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog for the CLI: console on a terminal, JSON otherwise.

    Events below ``level`` are dropped before any formatting, so a quiet worker
    pays almost nothing per job for its log calls.
    """
    numeric = (
        logging.getLevelNamesMapping().get(level.upper())
        if hasattr(logging, "getLevelNamesMapping")
        else logging.getLevelName(level.upper())
    )
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
