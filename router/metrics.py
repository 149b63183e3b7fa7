"""Prometheus metrics. One Metrics object per running router (own registry, so tests start clean).

Labels never carry secrets: channel and rule names come from ops files, never URLs or tokens."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from router import __version__


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Info("imm_router_build", "Version of imm-router", registry=r)
        self.build_info.info({"version": __version__})
        self.records = Counter("imm_router_records_consumed", "Records consumed", ["wire_format"], registry=r)
        self.decode_failures = Counter("imm_router_decode_failures", "Records that failed to decode", registry=r)
        self.rule_matches = Counter("imm_router_rule_matches", "Events a rule matched", ["rule"], registry=r)
        self.rule_errors = Counter("imm_router_rule_errors", "Rule evaluation errors", ["rule"], registry=r)
        self.render_failures = Counter(
            "imm_router_render_failures", "Template render failures", ["channel"], registry=r
        )
        self.sent = Counter("imm_router_notifications_sent", "Notifications delivered", ["channel"], registry=r)
        self.failed = Counter("imm_router_notifications_failed", "Failed delivery attempts", ["channel"], registry=r)
        self.retried = Counter("imm_router_notifications_retried", "Delivery retries", ["channel"], registry=r)
        self.dead_lettered = Counter(
            "imm_router_notifications_dead_lettered",
            "Notifications given up and dead-lettered",
            ["channel"],
            registry=r,
        )
        self.digested = Counter(
            "imm_router_notifications_digested",
            "Notifications merged into a digest by the rate limit",
            ["channel"],
            registry=r,
        )
        self.digests_sent = Counter("imm_router_digests_sent", "Digest messages delivered", ["channel"], registry=r)
        self.duplicates = Counter(
            "imm_router_notifications_deduplicated",
            "Notifications suppressed as already delivered",
            ["channel"],
            registry=r,
        )
        self.latency = Histogram(
            "imm_router_delivery_latency_seconds",
            "Record timestamp to notification delivered",
            ["channel"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.dead_letter_records = Counter(
            "imm_router_dead_letter_records", "Records produced to the DLQ", ["reason"], registry=r
        )
        self.lag = Gauge("imm_router_consumer_lag", "Consumer lag in records", ["topic", "partition"], registry=r)
        self.in_flight = Gauge("imm_router_in_flight_records", "Records being routed", registry=r)
        self.paused = Gauge("imm_router_fetch_paused", "1 while fetching is paused by backpressure", registry=r)
        self.commits = Counter("imm_router_offset_commits", "Offset commits", registry=r)
        self.reloads = Counter("imm_router_config_reloads", "Config reloads", ["result"], registry=r)
        self.suppressed = Counter(
            "imm_router_notifications_suppressed",
            "Notifications not sent: silenced, inhibited, muted, throttled (held for a summary) or duplicate",
            ["channel", "reason"],
            registry=r,
        )
        self.groups_open = Gauge("imm_router_groups_open", "Alert groups this replica owns and keeps", registry=r)
        self.group_messages = Counter(
            "imm_router_group_messages_sent", "Group and throttle-summary messages delivered", ["channel"], registry=r
        )
        self.silences_active = Gauge("imm_router_silences_active", "Silences in force now", registry=r)
        self.handoffs = Counter(
            "imm_router_notifications_handed_off", "Notifications produced to the notifications topic", registry=r
        )
        self.handoffs_taken = Counter(
            "imm_router_notifications_taken_locally",
            "Handed-off notifications this replica owned and handled at once, without reading them back",
            registry=r,
        )
        self.owned_partitions = Gauge(
            "imm_router_owned_partitions", "Partitions of the notifications topic this replica owns", registry=r
        )
        self.circuit_open = Gauge(
            "imm_router_circuit_open", "1 while a channel's circuit is open", ["channel"], registry=r
        )
        self.ingest_requests = Counter(
            "imm_router_ingest_requests", "HTTP ingest requests answered", ["endpoint", "status"], registry=r
        )
        self.ingest_refused = Counter(
            "imm_router_ingest_refused",
            "HTTP ingest requests refused (400, 403, 503)",
            ["endpoint", "reason"],
            registry=r,
        )
        self.ingest_events = Counter(
            "imm_router_ingest_events", "Events produced to the source topic from HTTP ingest", ["endpoint"], registry=r
        )
        self.ingest_in_flight = Gauge("imm_router_ingest_in_flight", "HTTP ingest requests being handled", registry=r)
