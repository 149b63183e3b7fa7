"""What flows from rendering into delivery: one notification for one (event, rule, channel)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# Not frozen: a frozen dataclass's __init__ costs three times as much, paid for every alert twice (rendered,
# then read from its handoff). Nothing changes a notification once made.
@dataclass(slots=True)
class Notification:
    event_id: str
    event_type: str
    rule: str
    channel: str
    template: str
    severity: str
    payload: dict[str, Any]
    # A one-line summary and the event's normalized view, kept for digests.
    summary: str = ""
    view: dict[str, Any] = field(default_factory=dict)

    @property
    def dedup_key(self) -> tuple[str, str, str]:
        return (self.event_id, self.rule, self.channel)

    def route_line(self) -> dict[str, Any]:
        """The line ``imm-router route`` prints."""
        return {
            "event_id": self.event_id,
            "event_type": self.event_type,
            "rule": self.rule,
            "channel": self.channel,
            "template": self.template,
            "payload": self.payload,
        }
