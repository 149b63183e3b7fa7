"""The exception hierarchy: everything imm-router raises on purpose derives from RouterError.

RouterError
├── ConfigError      an ops file (config, rule, template, rule test) is invalid; names file:line
├── DecodeError      a record is not an IMM event; names the input and the problem
├── RenderError      a template failed at render time for one event
└── DeliveryError    a channel could not deliver; ``retriable`` says whether trying again can help
"""

from __future__ import annotations


class RouterError(Exception):
    """Root of every error imm-router raises deliberately."""


class ConfigError(RouterError):
    """An ops-written file is invalid. The message names the file (and line) and what to fix."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        self.path = path
        self.line = line
        where = path if line is None or path is None else f"{path}:{line}"
        super().__init__(f"{where}: {message}" if where else message)


class DecodeError(RouterError):
    """A record could not be decoded into an IMM event."""

    def __init__(self, reason: str, *, source: str = "record") -> None:
        self.reason = reason
        self.source = source
        super().__init__(f"{source}: {reason}")


class RenderError(RouterError):
    """A template raised while rendering one notification."""


class DeliveryError(RouterError):
    """One delivery attempt failed. ``retriable`` tells the retry stage whether to try again."""

    def __init__(self, message: str, *, retriable: bool, channel: str = "") -> None:
        self.retriable = retriable
        self.channel = channel
        self.reason = message
        kind = "retriable" if retriable else "permanent"
        super().__init__(f"{channel + ': ' if channel else ''}{message} ({kind})")
