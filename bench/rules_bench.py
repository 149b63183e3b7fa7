"""Events/s through 100 and 1,000 rules: the indexed RuleSet beside a naive loop (compiled JMESPath for
every rule on every event), measured in the same run, reported as ratios.

The rule mix is what a large installation looks like: mostly per-project (per-tenant) routing of
failures, moderation and error codes, plus type-scoped and global rules with no equality test. Events
are the seed examples of both IMM documents with projects drawn from a universe that grows with the
rule count, so that about 5% of events match some rule at either size.

Two mixes: the per-project one above, and a "hard" one where 35% of the rules have no equality test the
index can use (starts_with, contains, filters, ordering, glob), as rule authors write them.

Each rate is the best of a few interleaved slices (--rounds), so that another process on the machine
slows all runs alike rather than one of them.

Run: python bench/rules_bench.py [--events N] [--seconds S] [--rounds R]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError

from router.decode import Event, decode_object
from router.engine import load
from router.expr import truthy
from router.rules import JMESPATH_OPTIONS, RuleSet, rule_root

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ROOT / "tests" / "events"

RULE_SHAPES = [
    ('["imm:Task:*"]', "ProjectName == '{p}' && imm.outcome == 'failed'"),
    ('["imm:Task:ImageModeration", "imm:Task:VideoModeration"]', "imm.project == '{p}' && Suggestion == 'block'"),
    ("", "imm.project == '{p}' && imm.error_code == 'InvalidArgument'"),
    ('["imm:FileMeta:*", "imm:Engine:*"]', "contains(['{p}', '{q}'], imm.project) && imm.failed"),
    ('["imm:Task:MediaConvert"]', "ProjectName == '{p}' && imm.duration_seconds > `600`"),
    ('["imm:Batch:*", "imm:Trigger:*"]', "imm.project == '{p}' && Statistic.SubmitFailure > `0`"),
]
# Conditions with no equality test the index can use (or only an unselective one such as imm.outcome):
# the "hard" mix makes 35% of its rules of these shapes.
HARD_SHAPES = [
    ('["imm:Task:*"]', "imm.outcome == 'failed' && starts_with(imm.project || '', '{p}')"),
    ("", "contains(imm.error_message || '', '{p}')"),
    ('["imm:FileMeta:*", "imm:Engine:*"]', "length(imm.failed_files[?contains(error, '{p}')]) > `0`"),
    ("", "imm.duration_seconds > `{n}` && imm.project != '{p}'"),
    ('["imm:Task:*"]', "glob('{p}*', imm.project) && imm.failed"),
]
GLOBAL_RULES = [
    ('["imm:Task:MediaConvert"]', "length(Targets[?Code != '']) > `5`"),
    ("", "imm.outcome == 'failed' && imm.error_code == 'QuotaExceeded'"),
    ('["imm:Task:*"]', "starts_with(imm.task_id || '', 'urgent-')"),
    ("", "Statistic.SubmitFailure > `100`"),
]


def seed_payloads() -> list[dict[str, Any]]:
    events = []
    for path in sorted(EVENTS.rglob("*.json")):
        obj = json.loads(path.read_text())
        if "content" in obj:
            continue
        events.append(obj if "specversion" in obj else {"specversion": "1.0", "type": "", "data": obj})
    return events


def make_rules(directory: Path, count: int, projects: list[str], rnd: random.Random, hard: float) -> None:
    lines = ["rules:"]
    shapes = [*GLOBAL_RULES]
    while len(shapes) < count:
        events, when = rnd.choice(HARD_SHAPES if rnd.random() < hard else RULE_SHAPES)
        p, q = rnd.choice(projects), rnd.choice(projects)
        shapes.append((events, when.format(p=p, q=q, n=rnd.randrange(60, 86_400))))
    for i, (events, when) in enumerate(shapes[:count]):
        lines.append(f"  - name: r{i}")
        if events:
            lines.append(f"    events: {events}")
        lines.append(f"    when: {json.dumps(when)}")
        lines.append("    notify: [{channel: topic, template: t.j2}]")
    (directory / "rules").mkdir(parents=True, exist_ok=True)
    (directory / "rules" / "bench.yaml").write_text("\n".join(lines) + "\n")
    (directory / "templates" / "digest").mkdir(parents=True, exist_ok=True)
    (directory / "templates" / "t.j2").write_text("{% block value %}{{ rule.name }}{% endblock %}")
    (directory / "templates" / "digest" / "kafka.j2").write_text("{% block value %}{{ count }}{% endblock %}")
    (directory / "router.yaml").write_text("channels:\n  topic: {type: kafka, topic: alerts}\n")


def make_events(n: int, projects: list[str], rnd: random.Random) -> list[Event]:
    seeds = seed_payloads()
    out = []
    for i in range(n):
        seed = rnd.choice(seeds)
        data = dict(seed["data"])
        key = "Project" if "Project" in data else "ProjectName"
        data[key] = rnd.choice(projects)
        out.append(decode_object({**seed, "id": f"e{i}", "data": data}))
    return out


def rate(fn: Callable[[Event], Any], events: list[Event], seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while True:
        for event in events:
            fn(event)
        done += len(events)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


Run = tuple[Callable[[Event], Any], list[Event]]


def runs(count: int, n_events: int, hard: float) -> tuple[Run, Run, float]:
    """The indexed and the naive router over ``count`` rules with their events, and the share of events
    matching some rule."""
    rnd = random.Random(count)
    projects = [f"proj-{i}" for i in range(count)]
    with tempfile.TemporaryDirectory() as tmp:
        make_rules(Path(tmp), count, projects, rnd, hard)
        engine = load(Path(tmp) / "router.yaml")
    ruleset: RuleSet = engine.rules
    naive_rules = [jmespath.compile(r.spec.when) for r in ruleset.rules]
    events = make_events(n_events, projects, rnd)

    def indexed(event: Event) -> int:
        return len(ruleset.match(event, rule_root(event)))

    def naive(event: Event) -> int:
        root, hits = rule_root(event), 0
        for expr in naive_rules:
            with contextlib.suppress(JMESPathError):
                hits += truthy(expr.search(root, options=JMESPATH_OPTIONS))
        return hits

    matched = sum(1 for e in events if indexed(e)) / len(events)
    return (indexed, events), (naive, events[: max(50, n_events // 20)]), matched


def best_rates(measured: dict[str, Run], seconds: float, rounds: int) -> dict[str, float]:
    """Each run's best rate over ``rounds`` interleaved slices of ``seconds``: another process taking the
    core for a while then slows a slice of each run, not the whole of one of them."""
    best = dict.fromkeys(measured, 0.0)
    for _ in range(rounds):
        for name, (fn, events) in measured.items():
            best[name] = max(best[name], rate(fn, events, seconds / rounds))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=5_000)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement, over all rounds")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    counts = (100, 1_000)
    for mix, hard in (("per-project", 0.0), ("hard (35% without a usable equality test)", 0.35)):
        measured: dict[str, Run] = {}
        matched: dict[int, float] = {}
        for count in counts:
            measured[f"indexed {count}"], measured[f"naive {count}"], matched[count] = runs(count, args.events, hard)
        rates = best_rates(measured, args.seconds, args.rounds)
        print(f"mix: {mix}")
        print(f"{'rules':>6} {'indexed ev/s':>14} {'naive ev/s':>12} {'indexed/naive':>14} {'events matching':>16}")
        for count in counts:
            indexed, naive = rates[f"indexed {count}"], rates[f"naive {count}"]
            print(f"{count:>6} {indexed:>14,.0f} {naive:>12,.0f} {indexed / naive:>13.1f}x {matched[count]:>15.1%}")
        scale = rates["indexed 1000"] / rates["indexed 100"]
        print(f"1,000-rule rate / 100-rule rate (indexed): {scale:.2f}x\n")


if __name__ == "__main__":
    main()
