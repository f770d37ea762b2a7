"""Structured logs: structlog for our lines, and stdlib and uvicorn records routed through the same renderer.

JSON lines by default, a human console format with BILLING_LOG_FORMAT=console (the default when the
database is embedded). Every line logged while a request is served carries its `request_id` (bound by
`observability.RequestTelemetryMiddleware` in structlog's contextvars). Bearer tokens, JWTs and the
configured service tokens are scrubbed from every line, whoever logged it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from typing import Any

import structlog
from structlog.types import EventDict, Processor, WrappedLogger

_BEARER = re.compile(r"(?i)\bbearer\s+[^\s\"',;]+")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class _Redact:
    """Scrubs credentials from every string in a log event: a token in a log is a leaked token."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted({secret for secret in secrets if len(secret) >= 8}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        # Cheap substring tests first: nearly every string in a log line contains neither.
        if "eyJ" in text:
            text = _JWT.sub("[REDACTED_JWT]", text)
        if "bearer" in text.lower():
            text = _BEARER.sub("Bearer [REDACTED]", text)
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "[REDACTED]")
        return text

    def __call__(self, _: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        for key, value in event_dict.items():
            if isinstance(value, str):
                event_dict[key] = self.scrub(value)
        return event_dict


def configure_logging(*, log_format: str, level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    """Route structlog, stdlib and uvicorn logging to stderr through one renderer. Idempotent."""
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    # Last before rendering, so tracebacks and foreign messages are scrubbed too.
    finish: list[Processor] = [structlog.processors.format_exc_info, _Redact(secrets), renderer]
    # Our own lines (the access line on every request) skip the stdlib machinery: rendered and written
    # directly, which costs a fraction of a LogRecord's round trip through logging.
    structlog.configure(
        processors=[*shared, _name_the_logger, *finish],
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *finish],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
        uvicorn_logger.setLevel(logging.NOTSET)
    # Silenced: the telemetry middleware writes the one access line per request, with its request id.
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers.clear()
    uvicorn_access.propagate = False


def get_logger(name: str) -> Any:
    # `logger` is a parameter of structlog.get_logger itself, so the name travels as `logger_name`.
    return structlog.get_logger(logger_name=name)


def _name_the_logger(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    event_dict["logger"] = event_dict.pop("logger_name", "billing_service")
    return event_dict
