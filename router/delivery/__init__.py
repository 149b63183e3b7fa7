"""Delivery: the stages between a rendered notification and its channel (``pipeline``), the per-channel
rate limiter, dedup memory and circuit breaker they use, and live channel health checks (``health``)."""
