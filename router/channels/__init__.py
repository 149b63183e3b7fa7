"""Destinations. One module per channel type: its config model, payload builder and sender."""
