"""Memory of delivered notifications (event id, rule, channel) for a TTL, bounded in size."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable


class DedupMemory:
    def __init__(self, ttl: float, max_entries: int, *, clock: Callable[[], float]) -> None:
        self._clock = clock
        # Oldest first; with one TTL for all, that is also soonest to expire first.
        self._expiry: OrderedDict[Hashable, float] = OrderedDict()
        self.configure(ttl, max_entries)

    def configure(self, ttl: float, max_entries: int) -> None:
        """``ttl`` 0 turns it off."""
        self.ttl = ttl
        self.max_entries = max_entries
        if ttl <= 0:
            self._expiry.clear()

    def seen(self, key: Hashable) -> bool:
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if expiry <= self._clock():
            del self._expiry[key]
            return False
        return True

    def mark(self, key: Hashable) -> None:
        if self.ttl <= 0:
            return
        now = self._clock()
        self._expiry[key] = now + self.ttl
        self._expiry.move_to_end(key)
        while self._expiry:
            expiry = next(iter(self._expiry.values()))
            if expiry > now and len(self._expiry) <= self.max_entries:
                break
            self._expiry.popitem(last=False)

    def remember(self, key: Hashable, expiry: float) -> None:
        """Take over an entry from another process (``expiry`` on this memory's clock)."""
        if self.ttl > 0 and expiry > self._clock():
            self._expiry[key] = expiry
            self._expiry.move_to_end(key)

    def expiry(self, key: Hashable) -> float | None:
        return self._expiry.get(key)

    def __len__(self) -> int:
        return len(self._expiry)
