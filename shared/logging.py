"""structlog setup: JSON lines when stderr is not a TTY, readable console output when it is.

Bind context with ``log.bind(request_id=...)`` / ``instance_id=...``; every line carries it.
"""

from __future__ import annotations

import logging
import sys

import structlog

from shared.config import LogSettings


def configure_logging(settings: LogSettings, service: str) -> structlog.stdlib.BoundLogger:
    json_output = settings.json_output
    if json_output is None:
        json_output = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[settings.level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logger: structlog.stdlib.BoundLogger = structlog.get_logger().bind(service=service)
    return logger
