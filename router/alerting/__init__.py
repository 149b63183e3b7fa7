"""Alert management between rendering and delivery: what Alertmanager and ElastAlert2 users expect.

- :mod:`router.alerting.timing`: Alertmanager-style durations and ``time_intervals``;
- :mod:`router.alerting.silences`: silences created at run time, shared through a compacted topic;
- :mod:`router.alerting.topics`: creating the router's own topics and following a topic from its start;
- :mod:`router.alerting.inhibit`: ``inhibit_rules`` (a source alert mutes targets with equal keys);
- :mod:`router.alerting.handoff`: the record a routing replica hands to the owner of a channel;
- :mod:`router.alerting.manager`: the owner's per-channel state: dedup, suppression, throttles, groups.
"""
