"""Destinations. One module per channel type: its config model, payload builder and sender."""

from router.channels.registry import make_channel, scrubber

__all__ = ["make_channel", "scrubber"]
