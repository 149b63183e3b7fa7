"""Per-channel circuit breaker, so that one dead channel fails fast instead of tying up deliveries."""

from __future__ import annotations

from collections.abc import Callable

from router.channels.base import CircuitBreaker


class Breaker:
    """Closed until ``failure_threshold`` attempts in a row fail retriably; then open, and every attempt
    is refused for ``reset_seconds``; then one trial attempt goes through (half-open): its success
    closes the circuit, its failure opens it again. A permanent error (the server answered "no" to one
    message) shows the channel is up, so it counts as a success here."""

    def __init__(self, *, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.failures = 0
        self.open_until: float | None = None  # None: closed
        self._trial_since: float | None = None

    @property
    def is_open(self) -> bool:
        return self.open_until is not None

    @property
    def refusing(self) -> bool:
        """Open and not yet due for a trial."""
        return self.open_until is not None and self._clock() < self.open_until

    def allow(self, config: CircuitBreaker) -> bool:
        if self.open_until is None:
            return True
        if self.refusing:
            return False
        now = self._clock()
        # Half-open: one trial at a time; a trial whose outcome never came (cancelled) expires.
        if self._trial_since is not None and now < self._trial_since + config.reset_seconds:
            return False
        self._trial_since = now
        return True

    def record(self, ok: bool, config: CircuitBreaker) -> None:
        """Count an attempt's outcome."""
        self._trial_since = None
        if ok:
            self.failures = 0
            self.open_until = None
            return
        self.failures += 1
        if self.is_open or self.failures >= config.failure_threshold:
            self.open_until = self._clock() + config.reset_seconds
