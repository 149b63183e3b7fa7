"""Rules: YAML files of JMESPath conditions, compiled once and indexed so an event meets only the
rules that can match it.

Two indexes, both built at load:
- by event type: exact types and shell globs are resolved once per distinct type seen, then cached;
- by probe: a ``when`` that implies ``path == 'literal'`` (alone, under ``&&``, as an ``||`` of
  such tests on one path, or ``contains([...], path)``) is filed under that path and literal; other
  implied tests (prefixes, substrings, ranges, a filter's condition on each element: see "index"
  below) are filed likewise. An event evaluates each indexed path once and looks the value up, so
  1,000 rules cost about what 100 do. Rules with no such test are evaluated for every event of their
  types.
"""

from __future__ import annotations

import bisect
import contextlib
import difflib
import fnmatch
import itertools
import json
import logging
import operator
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from jmespath import functions
from jmespath.exceptions import JMESPathError, LexerError, ParseError
from jmespath.lexer import Lexer
from jmespath.visitor import Options
from pydantic import Field, field_validator

from router import expr
from router.alerting.timing import Duration
from router.channels.base import Frozen
from router.decode import Event
from router.errors import ConfigError
from router.expr import Expression, comparable, is_number, truthy
from router.imm import ENVELOPE_KEYS, KNOWN_EVENT_TYPES, MODERATION_KEYS, VIEW_KEYS, canonical_type
from router.opsfile import LineDict, LineList, did_you_mean, load_yaml, validate

log = logging.getLogger(__name__)

_TYPE_CACHE_MAX = 4_096


class Throttle(Frozen):
    """ElastAlert's realert with aggregation: after a message for a key, hold that key's alerts ``for``
    this long, then send one summary of what was held."""

    key: tuple[str, ...] = Field(min_length=1, description="JMESPath on the rule root")
    for_: Duration = Field(alias="for", gt=0)


class Notify(Frozen):
    channel: str = Field(min_length=1)
    template: str = Field(min_length=1)
    # Alertmanager's grouping: one group per distinct tuple of group_by values (JMESPath on the rule root).
    group_by: tuple[str, ...] | None = None
    group_wait: Duration = Field(default=30.0, ge=0)
    group_interval: Duration = Field(default=300.0, gt=0)
    group_template: str | None = None
    throttle: Throttle | None = None
    active_time_intervals: tuple[str, ...] = ()
    mute_time_intervals: tuple[str, ...] = ()

    @property
    def managed(self) -> bool:
        """Whether alerts for this target are grouped or throttled rather than sent one by one."""
        return self.group_by is not None or self.throttle is not None


class RuleSpec(Frozen):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str = ""
    events: tuple[str, ...] | None = None
    when: str = Field(min_length=1)
    severity: Literal["critical", "warning", "info"] = "warning"
    notify: tuple[Notify, ...] = Field(min_length=1)
    labels: dict[str, str] = Field(default_factory=dict)
    enabled: bool = True

    @field_validator("events")
    @classmethod
    def _non_empty(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and (not value or any(not p for p in value)):
            raise ValueError("events must list one or more type patterns, e.g. ['imm:Task:*']; omit it for all")
        return value


class RuleFile(Frozen):
    rules: tuple[RuleSpec, ...] = ()


class _Functions(functions.Functions):
    """Extra JMESPath functions for rule authors (documented in the README)."""

    @functions.signature({"types": ["string", "null"]})
    def _func_lower(self, s: str | None) -> str | None:
        return s.lower() if s is not None else None

    @functions.signature({"types": ["string", "null"]})
    def _func_upper(self, s: str | None) -> str | None:
        return s.upper() if s is not None else None

    @functions.signature({"types": ["string"]}, {"types": ["string", "null"]})
    def _func_glob(self, pattern: str, s: str | None) -> bool:
        return s is not None and fnmatch.fnmatchcase(s, pattern)


RULE_FUNCTIONS = _Functions()
JMESPATH_OPTIONS = Options(custom_functions=RULE_FUNCTIONS)


@dataclass(eq=False)
class Rule:
    spec: RuleSpec
    order: int
    path: Path
    line: int
    expression: Expression
    errors: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def applies_to(self, event_type: str) -> bool:
        patterns = self.spec.events
        return patterns is None or any(fnmatch.fnmatchcase(event_type, p) for p in patterns)


# --- index -----------------------------------------------------------------------------------
#
# From a rule's condition, probes: what must hold of one sub-expression of the root (its subject) for the
# rule to match. The index evaluates each subject once per event and keeps only the rules whose probe
# holds; they then get their full evaluation, so a probe need only be implied, never exact. A probe never
# hides an evaluation error: it comes from a top-level conjunct evaluated after conjuncts that cannot
# raise, and a subject value that would make its conjunct raise (or a subject that raises) keeps the rules.
#   eq         subject == 'literal' (alone, an || of such on one subject, contains(['a', 'b'], subject))
#   prefix     starts_with(subject, 'literal')
#   contains   contains(subject, 'literal'): a substring of a string, an element of a list
#   truthy     the conjunct itself, where several rules share it (imm.failed)
#   nonempty   length(subject) > n (n >= 0): subject is not an empty string, list or object
#   items      length(subject[?...]) > n, length(subject[*].x) > n: subject is not an empty list
#   above      subject > n, subject >= n (n a number): subject is a number at least n (or a string: raises)
#   below      subject < n, subject <= n
#   present    subject < 'literal' (any ordering) or glob('*pattern', subject): subject is not null
#              (glob('abc*', subject) is a prefix probe)
# and per element: length(list[?cond]) > n can hold only if cond holds of (or raises on) some element of
# list, so each probe of cond is also a probe of the rule, read on every element (a probe ``within`` list).

EVAL_ERRORS = (JMESPathError, TypeError, ValueError, RecursionError)

Kind = Literal["eq", "prefix", "contains", "above", "below", "truthy", "nonempty", "items", "present"]
_KIND_ORDER: dict[Kind, int] = {k: i for i, k in enumerate(Kind.__args__)}  # type: ignore[attr-defined]
_LITERAL_PROBES: dict[str, Kind] = {"starts_with": "prefix", "contains": "contains"}
# Nodes that evaluate without raising when their children do (functions and ordering can raise).
_SAFE_NODES = frozenset(
    (
        *("field", "subexpression", "current", "identity", "literal", "index", "slice", "pipe"),
        *("index_expression", "projection", "value_projection", "filter_projection", "flatten"),
        *("multi_select_list", "multi_select_dict", "key_val_pair", "and_expression", "or_expression"),
        "not_expression",
    )
)


@dataclass(frozen=True)
class Probe:
    kind: Kind
    subject: str  # canonical form of the subject's tree: rules sharing a subject share its evaluation
    values: frozenset[Any] = frozenset()  # the literals (eq, prefix, contains) or the bound (above, below)
    within: str | None = None  # a list's subject: the probe holds of one of its elements (see _length_probes)


def _safe(node: dict[str, Any]) -> bool:
    kind = node["type"]
    if kind == "comparator" and node["value"] in ("eq", "ne"):
        pass
    elif kind not in _SAFE_NODES:
        return False
    return all(_safe(c) for c in node.get("children", []) if isinstance(c, dict))


def _subject(node: dict[str, Any]) -> str | None:
    return None if node["type"] == "literal" else json.dumps(node, sort_keys=True)


def _string_literal(node: dict[str, Any]) -> str | None:
    return node["value"] if node["type"] == "literal" and isinstance(node["value"], str) else None


def implied_values(node: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> dict[str, frozenset[str]]:
    """Subjects whose value must be one of a set of strings for ``node`` to be true (``nodes`` collects
    each subject's tree)."""
    kind = node["type"]
    if kind == "comparator" and node["value"] == "eq":
        left, right = node["children"]
        for subject_node, lit_node in ((left, right), (right, left)):
            subject, literal = _subject(subject_node), _string_literal(lit_node)
            if subject is not None and literal is not None:
                nodes[subject] = subject_node
                return {subject: frozenset({literal})}
        return {}
    if kind == "and_expression":
        merged: dict[str, frozenset[str]] = {}
        for child in node["children"]:
            for subject, values in implied_values(child, nodes).items():
                merged[subject] = merged[subject] & values if subject in merged else values
        return merged
    if kind == "or_expression":
        left, right = (implied_values(c, nodes) for c in node["children"])
        return {p: left[p] | right[p] for p in left.keys() & right.keys()}
    if kind == "function_expression" and node["value"] == "contains" and len(node["children"]) == 2:
        haystack, needle = node["children"]
        subject = _subject(needle)
        if subject is not None and haystack["type"] in ("multi_select_list", "literal"):
            items = haystack["children"] if haystack["type"] == "multi_select_list" else None
            options: Any = [_string_literal(c) for c in items] if items is not None else haystack["value"]
            if isinstance(options, list) and options and all(isinstance(v, str) for v in options):
                nodes[subject] = needle
                return {subject: frozenset(options)}
    return {}


def _conjuncts(node: dict[str, Any]) -> list[dict[str, Any]]:
    if node["type"] == "and_expression":
        return [c for child in node["children"] for c in _conjuncts(child)]
    return [node]


def _length_base(node: dict[str, Any]) -> dict[str, Any] | None:
    """x of ``length(x) > n`` (n >= 0) or ``length(x) >= n`` (n >= 1): true only if x is not empty."""
    if node["type"] != "comparator" or node["value"] not in ("gt", "gte"):
        return None
    call, bound = node["children"]
    if call["type"] != "function_expression" or call["value"] != "length" or len(call["children"]) != 1:
        return None
    n = bound["value"] if bound["type"] == "literal" else None
    if not isinstance(n, int | float) or isinstance(n, bool) or n < (0 if node["value"] == "gt" else 1):
        return None
    base: dict[str, Any] = call["children"][0]
    return base


def _probe(kind: Kind, node: dict[str, Any], values: frozenset[Any], nodes: dict[str, dict[str, Any]]) -> list[Probe]:
    subject = _subject(node)
    if subject is None:
        return []
    nodes[subject] = node
    return [Probe(kind, subject, values)]


def _probes_of(c: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> list[Probe]:
    """The probes one conjunct gives besides equality."""
    kind, children = c["type"], c.get("children", [])
    if kind == "function_expression" and len(children) == 2:
        name = c["value"]
        literal = _string_literal(children[1])
        if name in _LITERAL_PROBES and literal:  # '' is a prefix and a substring of every string
            return _probe(_LITERAL_PROBES[name], children[0], frozenset([literal]), nodes)
        pattern = _string_literal(children[0])
        if name == "glob" and pattern is not None:
            prefix = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
            if prefix:
                return _probe("prefix", children[1], frozenset([prefix]), nodes)
            return _probe("present", children[1], frozenset(), nodes)
        return []
    if kind == "comparator" and c["value"] in ("lt", "gt", "lte", "gte"):
        left, right = children
        base = _length_base(c)
        if base is not None:
            return _length_probes(base, nodes)
        for operand, other, upward in ((left, right, ("gt", "gte")), (right, left, ("lt", "lte"))):
            if other["type"] == "literal" and comparable(other["value"]) and _safe(operand):
                if not is_number(other["value"]):
                    return _probe("present", operand, frozenset(), nodes)
                bound = frozenset([other["value"]])
                return _probe("above" if c["value"] in upward else "below", operand, bound, nodes)
        return []
    if _safe(c) and kind not in ("literal", "comparator"):
        return _probe("truthy", c, frozenset(), nodes)
    return []


def _length_probes(base: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> list[Probe]:
    """Probes of ``length(base) > n``: base is not empty; and for a filter ``items[?cond]``, the probes of
    cond read on each element of items (the filter is empty, without an error, unless some element
    passes or raises)."""
    if base["type"] not in ("projection", "filter_projection", "flatten"):
        return _probe("nonempty", base, frozenset(), nodes)
    each: list[Probe] = []
    if base["type"] == "filter_projection":
        items, _, condition = base["children"]
        within = _subject(items)
        if within is not None:
            nodes[within] = items
            # One level: a filter inside the condition is not probed per element of its elements.
            each = [replace(p, within=within) for p in rule_probes(condition, nodes) if p.within is None]
    while base["type"] in ("projection", "filter_projection", "flatten"):
        base = base["children"][0]
    return [*each, *_probe("items", base, frozenset(), nodes)]


def rule_probes(node: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> list[Probe]:
    """Every probe ``node`` implies (collecting each subject's tree in ``nodes``): from its top-level
    conjuncts in order, up to and including the first that could raise."""
    found: list[Probe] = []
    for c in _conjuncts(node):
        eq = implied_values(c, nodes)
        found.extend(Probe("eq", subject, values) for subject, values in eq.items())
        if not eq:
            found.extend(_probes_of(c, nodes))
        if not _safe(c):
            break
    return found


Getter = Callable[[Any], Any]
# Adds to ``found`` the rules of one table whose probe holds of a subject's value, and those whose condition
# would raise on it (they are evaluated, so the error is counted as plain evaluation counts it).
Collect = Callable[[Any, list[Rule]], None]


def _collector(kind: Kind, entries: list[tuple[Probe, Rule]], every: list[Rule]) -> Collect:
    if kind in ("above", "below"):
        return _bounded(kind, entries, every)
    if kind not in ("eq", "prefix", "contains"):
        return _gate(kind, every)
    by_value: dict[str, list[Rule]] = defaultdict(list)
    for probe, rule in entries:
        for value in probe.values:
            by_value[value].append(rule)
    table = dict(by_value)
    if kind == "eq":
        return _equal(table)
    if kind == "prefix":
        return _prefixed(table, every)
    return _containing(table, every)


def _equal(table: dict[str, list[Rule]]) -> Collect:
    def collect(value: Any, found: list[Rule]) -> None:
        if isinstance(value, str) and (hit := table.get(value)):
            found.extend(hit)

    return collect


def _prefixed(table: dict[str, list[Rule]], every: list[Rule]) -> Collect:
    # A lookup per distinct literal length: few, however many literals (one regular expression over them
    # would try each literal that shares the value's start, and rule prefixes mostly share theirs).
    lengths = sorted({len(v) for v in table})

    def collect(value: Any, found: list[Rule]) -> None:
        if not isinstance(value, str):
            found.extend(every)  # starts_with raises on it (glob is false on null: evaluated, no harm)
            return
        for n in lengths:
            if n > len(value):
                break
            if hit := table.get(value[:n]):
                found.extend(hit)

    return collect


class _Substrings:
    """Which of many literals (none empty) occur in a string, found by one regular expression rather than
    a search per literal: most strings contain none, which it tells at C speed. The expression matches,
    at a place, the longest literal there; the others there are its prefixes."""

    def __init__(self, literals: Iterable[str]) -> None:
        ordered = sorted(literals, key=len, reverse=True)
        trie: dict[str, Any] = {}
        for literal in ordered:
            node = trie
            for char in literal:
                node = node.setdefault(char, {})
            node[""] = {}  # a literal ends here
        pattern = _trie_pattern(trie, room=50)
        if pattern is None:  # too deeply nested for re's parser (literals such as a, aa, aaa, ...)
            pattern = "|".join(map(re.escape, ordered))  # longest first: the alternation takes the first
        self.search = re.compile(pattern).search
        known = set(ordered)
        self.prefixes = {lit: [lit[:n] for n in range(1, len(lit) + 1) if lit[:n] in known] for lit in ordered}

    def of(self, value: str) -> set[str]:
        found: set[str] = set()
        match = self.search(value)
        while match is not None:
            found.update(self.prefixes[match.group()])
            match = self.search(value, match.start() + 1)
        return found


def _trie_pattern(node: dict[str, Any], room: int) -> str | None:
    """A trie of literals as a regular expression: at each place, matching tries only the branch for the
    next character (an alternation of the literals would try every literal), and an optional tail is
    greedy, so the longest literal wins. None if it would nest more than ``room`` levels."""
    if room < 0:
        return None
    branches = []
    for char, child in node.items():
        if not char:
            continue
        run = char
        while len(child) == 1 and "" not in child:  # a chain without choices: one run of characters
            (char, child), *_ = child.items()
            run += char
        tail = _trie_pattern(child, room - 1)
        if tail is None:
            return None
        branches.append(re.escape(run) + tail)
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
    return f"(?:{body})?" if "" in node else body


def _containing(table: dict[str, list[Rule]], every: list[Rule]) -> Collect:
    substrings = _Substrings(table)

    def collect(value: Any, found: list[Rule]) -> None:
        if isinstance(value, str):
            present = substrings.of(value)
        elif isinstance(value, list):
            present = {v for v in value if isinstance(v, str)} & table.keys()
        else:
            found.extend(every)  # contains raises on it
            return
        for literal in present:
            found.extend(table[literal])

    return collect


def _bounded(kind: Kind, entries: list[tuple[Probe, Rule]], every: list[Rule]) -> Collect:
    ranked = sorted(((next(iter(probe.values)), rule) for probe, rule in entries), key=lambda e: e[0])
    bounds, rules = [bound for bound, _ in ranked], [rule for _, rule in ranked]

    def collect(value: Any, found: list[Rule]) -> None:
        if isinstance(value, str):
            found.extend(every)  # a string against a number raises: let them, to be counted
        elif is_number(value):
            if kind == "above":
                found.extend(rules[: bisect.bisect_right(bounds, value)])
            else:
                found.extend(rules[bisect.bisect_left(bounds, value) :])

    return collect


def _gate(kind: Kind, every: list[Rule]) -> Collect:
    holds: Callable[[Any], bool] = {
        "truthy": truthy,
        "present": lambda value: value is not None,
        "items": lambda value: not (isinstance(value, list) and not value),
        "nonempty": lambda value: not (isinstance(value, str | list | dict) and not value),
    }[kind]

    def collect(value: Any, found: list[Rule]) -> None:
        if holds(value):
            found.extend(every)

    return collect


def _each(get_item: Getter, collect: Collect, every: list[Rule]) -> Collect:
    """A probe read on each element of a list: the union of what each element keeps."""

    def collect_each(value: Any, found: list[Rule]) -> None:
        if not isinstance(value, list):
            found.extend(every)  # the filter gives null, and length(null) raises
            return
        hits: list[Rule] = []
        for item in value:
            if item is None:
                # Probes are read off conditions for a document that is not null; on null, the haystack of
                # contains(['a', 'b'], x) is null too, and contains raises.
                found.extend(every)
                return
            try:
                collect(get_item(item), hits)
            except EVAL_ERRORS:
                found.extend(every)
                return
        found.extend(dict.fromkeys(hits))  # once each, however many elements keep a rule

    return collect_each


_ORDER = operator.attrgetter("order")


@dataclass(frozen=True)
class Reads:
    """Which keys of the rule root's reserved documents ``imm`` and ``event`` expressions read (None: the
    document whole). The root is built with only those: the rest would be work for nothing."""

    imm: frozenset[str] | None = frozenset()
    event: frozenset[str] | None = frozenset()

    def __or__(self, other: Reads) -> Reads:
        return Reads(_union(self.imm, other.imm), _union(self.event, other.event))


def _union(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    return None if a is None or b is None else a | b


EVERYTHING = Reads(None, None)
_RESERVED = ("imm", "event")


def root_reads(parsed: dict[str, Any]) -> Reads:
    """What one parsed expression reads of ``imm`` and ``event``. Only ``imm.<key>…`` paths read part of
    a document; reading it any other way (``keys(imm)``, ``imm.*``) reads it whole, and reading the root
    itself (``@``, ``*``) reads everything."""
    keys: dict[str, set[str]] = {name: set() for name in _RESERVED}
    heads = dict.fromkeys(_RESERVED, 0)  # the document's name read from the root, and as a path's head
    paths = dict.fromkeys(_RESERVED, 0)
    for node, _, on_root in _nodes(parsed):
        if not on_root:
            continue
        kind, children = node["type"], node["children"]
        if kind in ("current", "identity"):
            return EVERYTHING
        if kind == "field" and node["value"] in heads:
            heads[node["value"]] += 1
        elif kind == "subexpression" and children[0]["type"] == "field" and children[1]["type"] == "field":
            name = children[0]["value"]
            if name in paths:
                keys[name].add(children[1]["value"])
                paths[name] += 1
    imm, event = (frozenset(keys[name]) if heads[name] == paths[name] else None for name in _RESERVED)
    return Reads(imm, event)


@dataclass
class _Plan:
    """The rules one event type can meet: always-evaluated ones, and per probed subject a table."""

    always: list[Rule]
    probes: list[tuple[Getter, Collect, list[Rule]]]  # the subject, its table, every rule in the table
    reads: Reads  # what its rules read of ``imm`` and ``event``

    def candidates(self, root: dict[str, Any]) -> list[Rule]:
        found = list(self.always)
        for get, collect, every in self.probes:
            try:
                value = get(root)
            except EVAL_ERRORS:
                found.extend(every)  # their conditions raise here: let them, to be counted
                continue
            collect(value, found)
        if len(found) > 1 and self.probes:
            found.sort(key=_ORDER)
        return found


@dataclass
class RuleSet:
    rules: list[Rule]
    # ``file:line: …`` for what is valid but would never match as meant (``check`` shows them).
    warnings: list[str] = field(default_factory=list)
    # Called with each rule that fails on an event (the service counts them per rule).
    on_error: Callable[[Rule], None] | None = None
    _plans: dict[str, _Plan] = field(default_factory=dict)
    _probes: dict[int, list[Probe]] = field(default_factory=dict)
    _getters: dict[str, Getter] = field(default_factory=dict)
    _reads: dict[int, Reads] = field(default_factory=dict)

    def __post_init__(self) -> None:
        nodes: dict[str, dict[str, Any]] = {}
        self._probes = {id(r): rule_probes(r.expression.parsed, nodes) for r in self.rules}
        self._reads = {id(r): root_reads(r.expression.parsed) for r in self.rules}
        self._getters = {subject: expr.compile_tree(node, RULE_FUNCTIONS) for subject, node in nodes.items()}

    def implied(self, rule: Rule) -> dict[tuple[str, ...], frozenset[str]]:
        """The field paths whose value must be one of these strings for ``rule`` to match."""
        found = {}
        for probe in self._probes[id(rule)]:
            path = expr.field_chain(json.loads(probe.subject)) if probe.kind == "eq" and not probe.within else None
            if path:
                found[path] = probe.values
        return found

    def plan(self, event_type: str) -> _Plan:
        plan = self._plans.get(event_type)
        if plan is None:
            if len(self._plans) >= _TYPE_CACHE_MAX:
                self._plans.clear()  # bounded: odd types can't grow memory
            plan = self._plans[event_type] = self._build_plan([r for r in self.rules if r.applies_to(event_type)])
        return plan

    def _build_plan(self, rules: list[Rule]) -> _Plan:
        # File each rule under its most selective probe: the one whose subject has the most distinct
        # values across these rules (then one read once before one read per element; then eq before
        # prefix before contains before gates).
        distinct: dict[tuple[Kind, str, str | None], set[str]] = defaultdict(set)
        for rule in rules:
            for probe in self._probes[id(rule)]:
                distinct[probe.kind, probe.subject, probe.within] |= probe.values or {""}
        always: list[Rule] = []
        filed: dict[tuple[Kind, str, str | None], list[tuple[Probe, Rule]]] = defaultdict(list)
        for rule in rules:
            probes = self._probes[id(rule)]
            if not probes:
                always.append(rule)
                continue
            best = max(
                probes,
                key=lambda p: (len(distinct[p.kind, p.subject, p.within]), p.within is None, -_KIND_ORDER[p.kind]),
            )
            filed[best.kind, best.subject, best.within].append((best, rule))
        tables = []
        for (kind, subject, within), entries in filed.items():
            every = [rule for _, rule in entries]
            collect = _collector(kind, entries, every)
            if within is None:
                tables.append((self._getters[subject], collect, every))
            else:
                tables.append((self._getters[within], _each(self._getters[subject], collect, every), every))
        reads = Reads()
        for rule in rules:
            reads |= self._reads[id(rule)]
        return _Plan(always, tables, reads)

    def root_for(self, event: Event) -> dict[str, Any]:
        """The rule root of ``event`` with as much of ``imm`` and ``event`` as its type's rules read (the
        same answers as ``rule_root`` for them; what else reads the root takes ``rule_root``)."""
        return rule_root(event, self.plan(event.type).reads)

    def match(self, event: Event, root: dict[str, Any]) -> list[Rule]:
        """Every rule whose types and condition match. A rule that errors does not match."""
        matched = []
        for rule in self.plan(event.type).candidates(root):
            try:
                if truthy(rule.expression.search(root)):
                    matched.append(rule)
            except EVAL_ERRORS as exc:
                rule.errors += 1
                if self.on_error is not None:
                    self.on_error(rule)
                if rule.errors == 1:
                    log.warning(
                        "rule %s (%s:%d) failed on event %s and is treated as not matching: %s",
                        rule.name,
                        rule.path,
                        rule.line,
                        event.id,
                        exc,
                    )
        return matched


def rule_root(event: Event, reads: Reads = EVERYTHING) -> dict[str, Any]:
    """The document a rule's ``when`` sees: the IMM payload plus the reserved keys ``imm`` and ``event``,
    those two with only what ``reads`` names (by default all of them)."""
    return {**event.data, "imm": event.view_of(reads.imm), "event": event.event_doc(reads.event)}


# --- loading ----------------------------------------------------------------------------------


# The interpreter recurses about twice per level; deeper expressions would hit Python's recursion limit
# while an event is evaluated (in the service, on the event loop).
MAX_EXPRESSION_DEPTH = 100
_COMPARATORS = frozenset({"eq", "ne", "lt", "lte", "gt", "gte"})
# Node types whose first child is evaluated against the same document as the node, and the rest
# against what the first child produced (so ``imm.x`` there is not the rule root's ``imm``).
_CHAINS = frozenset(
    {"subexpression", "index_expression", "projection", "value_projection", "filter_projection", "pipe", "flatten"}
)


def compile_expression(text: str, *, what: str, path: str | None = None, line: int | None = None) -> Expression:
    """Compile one JMESPath expression written by a person (a rule's ``when``, a ``group_by`` entry, a
    silence's ``--match``) with the rule functions; ``what`` names it in the error, which shows where the
    parse failed.

    Besides syntax it refuses what would fail on every event: unknown functions, wrong argument
    counts and nesting deeper than the interpreter can evaluate."""
    try:
        expression = expr.compile(text, functions=RULE_FUNCTIONS)
    except ParseError as exc:
        pointer = " " * (exc.lex_position or 0) + "^"
        raise ConfigError(
            f"{what} is not valid JMESPath ({exc.msg}):\n    {text}\n    {pointer}\n"
            "fix the expression (string literals take single quotes: Status == 'Failed')",
            path=path,
            line=line,
        ) from None
    except JMESPathError as exc:
        raise ConfigError(f"{what} is not valid JMESPath: {exc}", path=path, line=line) from None
    except RecursionError:
        raise ConfigError(
            f"{what} is nested too deeply to evaluate; split it into several rules, or test one path against "
            "many values with contains(['a', 'b'], path)",
            path=path,
            line=line,
        ) from None
    found = _nodes(expression.parsed)
    problem = _depth_problem(found) or _function_problem(found)
    if problem:
        raise ConfigError(f"{what}: {problem}", path=path, line=line)
    return expression


Nodes = list[tuple[dict[str, Any], int, bool]]


def _nodes(root: dict[str, Any]) -> Nodes:
    """Every node of a parsed expression with its depth and whether it reads the rule root (iterative:
    the tree may be deeper than Python's recursion limit)."""
    found = []
    stack = [(root, 1, True)]
    while stack:
        node, depth, on_root = stack.pop()
        found.append((node, depth, on_root))
        chain = node["type"] in _CHAINS
        children = [
            (child, depth + 1, on_root and not (chain and i > 0) and node["type"] != "expref")
            for i, child in enumerate(node.get("children", ()))
            if isinstance(child, dict)
        ]
        stack.extend(reversed(children))  # popped in source order
    return found


def _depth_problem(found: Nodes) -> str | None:
    depth = max(d for _, d, _ in found)
    if depth <= MAX_EXPRESSION_DEPTH:
        return None
    return (
        f"nested {depth} levels deep, more than the {MAX_EXPRESSION_DEPTH} that can be evaluated; split it into "
        "several rules, or test one path against many values with contains(['a', 'b'], path)"
    )


def _function_problem(found: Nodes) -> str | None:
    table = RULE_FUNCTIONS.FUNCTION_TABLE
    for node, _, _ in found:
        if node["type"] != "function_expression":
            continue
        name, given = node["value"], len(node["children"])
        if name not in table:
            hint = did_you_mean(name, table, suffix="()") or f"; functions: {', '.join(sorted(table))}"
            return f"unknown function {name}(){hint}"
        signature = table[name]["signature"]
        variadic = bool(signature) and signature[-1].get("variadic", False)
        if given < len(signature) or (given > len(signature) and not variadic):
            wanted = f"{'at least ' if variadic else ''}{len(signature)}"
            return f"{name}() takes {wanted} argument(s), not {given}"
    return None


def expression_warnings(expression: Any) -> list[str]:
    """What in a compiled expression is valid but almost certainly not meant: a path into ``imm`` or
    ``event`` that those documents never have, and a double-quoted right-hand side of a comparison
    (in JMESPath ``"prod"`` names a field; the string is ``'prod'``)."""
    found = []
    for node, _, on_root in _nodes(expression.parsed):
        path = expr.field_chain(node) if on_root else None
        if path and len(path) > 1 and path[0] in ("imm", "event"):
            problem = _unknown_key(path)
            if problem:
                found.append(problem)
    tokens = []
    if '"' in expression.text:
        with contextlib.suppress(LexerError):  # it compiled, so it lexes
            tokens = list(Lexer().tokenize(expression.text))
    for before, token in itertools.pairwise(tokens):
        if token["type"] == "quoted_identifier" and before["type"] in _COMPARATORS:
            found.append(
                f'"{token["value"]}" after {before["value"]} is a field name in JMESPath, not a string; '
                f"write '{token['value']}' to compare with the text"
            )
    return list(dict.fromkeys(found))


def _unknown_key(path: tuple[str, ...]) -> str | None:
    root, key = path[0], path[1]
    known = VIEW_KEYS if root == "imm" else ENVELOPE_KEYS
    if key not in known:
        hint = did_you_mean(key, known) or f"; {root} has: {', '.join(sorted(known))}"
        return f"{root}.{key} is not a key of `{root}` (always null){hint}"
    if root == "imm" and key == "moderation" and len(path) > 2 and path[2] not in MODERATION_KEYS:
        hint = did_you_mean(path[2], MODERATION_KEYS) or f"; it has: {', '.join(sorted(MODERATION_KEYS))}"
        return f"imm.moderation.{path[2]} is not a key of imm.moderation (always null){hint}"
    return None


def pattern_warnings(patterns: tuple[str, ...]) -> list[str]:
    """An ``events:`` pattern that matches none of the IMM event types (after the router's own type
    normalization), with the closest type there is."""
    found = []
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(t, pattern) for t in KNOWN_EVENT_TYPES):
            continue
        canonical = canonical_type(pattern)
        if canonical != pattern and canonical in KNOWN_EVENT_TYPES:
            hint = f"; events arrive as {canonical!r}, write that"
        else:
            lowered = {t.lower(): t for t in KNOWN_EVENT_TYPES}
            close = lowered.get(pattern.lower()) or next(
                iter(difflib.get_close_matches(pattern, sorted(KNOWN_EVENT_TYPES), n=1, cutoff=0.6)), None
            )
            hint = f"; did you mean {close!r}?" if close else '; see README "Event types"'
        found.append(f"events pattern {pattern!r} matches no IMM event type{hint}")
    return found


def search(expression: Expression, root: dict[str, Any]) -> Any:
    """Evaluate a compiled expression (the rule functions lower, upper, glob compiled in)."""
    return expression.search(root)


def _compile(spec: RuleSpec, path: Path, line: int) -> Expression:
    return compile_expression(spec.when, what=f"rule {spec.name!r}: `when`", path=str(path), line=line)


def rule_files(rules_dir: Path) -> list[Path]:
    if not rules_dir.is_dir():
        raise ConfigError("rules directory not found; set rules_dir in the config", path=str(rules_dir))
    # Kubernetes ConfigMap mounts keep old copies under ..<timestamp> directories: skip dot-dirs.
    return sorted(
        p
        for p in rules_dir.rglob("*")
        if p.suffix in (".yaml", ".yml")
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(rules_dir).parts)
    )


def load_rules(
    rules_dir: Path,
    check_notify: Callable[[Notify], str | None] = lambda n: None,
) -> RuleSet:
    """Load and compile every rule file. ``check_notify`` returns a problem with a notify entry, if any."""
    problems: list[str] = []
    warnings: list[str] = []
    rules: list[Rule] = []
    first_seen: dict[str, tuple[Path, int]] = {}
    for path in rule_files(rules_dir):
        try:
            doc = load_yaml(path)
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise ConfigError("a rule file is a mapping with a `rules:` list", path=str(path), line=1)
            parsed = validate(RuleFile, doc, path)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        items = doc.get("rules") or LineList()
        for i, spec in enumerate(parsed.rules):
            node = items[i]
            line = node.line if isinstance(node, LineDict) else 1
            if spec.name in first_seen:
                seen_path, seen_line = first_seen[spec.name]
                problems.append(
                    f"{path}:{line}: rule name {spec.name!r} is already used at {seen_path}:{seen_line}; "
                    "rule names must be unique"
                )
                continue
            first_seen[spec.name] = (path, line)
            when_line = node.key_lines.get("when", line) if isinstance(node, LineDict) else line
            try:
                expression = _compile(spec, path, when_line)
            except ConfigError as exc:
                problems.append(str(exc))
                continue
            events_line = node.key_lines.get("events", line) if isinstance(node, LineDict) else line
            for at, found in (
                (when_line, expression_warnings(expression)),
                (events_line, pattern_warnings(spec.events or ())),
            ):
                warnings.extend(f"{path}:{at}: rule {spec.name!r}: {w}" for w in found)
            notify_node = node.get("notify") if isinstance(node, LineDict) else None
            for j, target in enumerate(spec.notify):
                problem = check_notify(target)
                if problem:
                    at = notify_node.item_lines[j] if isinstance(notify_node, LineList) else line
                    problems.append(f"{path}:{at}: rule {spec.name!r}: {problem}")
            if spec.enabled:
                rules.append(Rule(spec, len(rules), path, line, expression))
    if problems:
        raise ConfigError("\n".join(problems))
    return RuleSet(rules, warnings)
