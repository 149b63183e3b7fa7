"""``inhibit_rules``: an alert of a source rule mutes alerts of target rules whose ``equal`` keys match.

A source is seen by whichever replica routes it, while its targets may be owned by another replica (a
target's channel decides its owner), so sources travel on a topic every replica follows.
"""

from __future__ import annotations

from pydantic import Field

from router.alerting.timing import Duration
from router.channels.base import Frozen


class InhibitRule(Frozen):
    source_rules: tuple[str, ...] = Field(min_length=1)
    target_rules: tuple[str, ...] = Field(min_length=1)
    equal: tuple[str, ...] = Field(default=(), description="JMESPath on the rule root; all must be equal")
    for_: Duration = Field(default=600.0, alias="for", gt=0, description="a source inhibits targets this long")
