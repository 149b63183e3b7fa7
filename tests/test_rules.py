"""Rule semantics, the indexes' equivalence with plain evaluation, and load errors people can act on."""

from __future__ import annotations

import logging
import random
import textwrap
from pathlib import Path

import jmespath
import pytest
from jmespath.exceptions import JMESPathError

from router.decode import decode, decode_object
from router.embedded.demo import demo_records
from router.engine import Engine, load
from router.errors import ConfigError
from router.expr import truthy
from router.imm import VIEW_KEYS
from router.rules import JMESPATH_OPTIONS, _Substrings, root_reads, rule_root

CONFIG = """\
rules_dir: rules
templates_dir: templates
channels:
  topic: {type: kafka, topic: alerts}
"""
TEMPLATE = "{% block value %}{{ rule.name }} {{ event.id }}{% endblock %}"


def make(tmp_path: Path, rules: str, templates: dict[str, str] | None = None) -> Path:
    (tmp_path / "rules").mkdir(exist_ok=True)
    (tmp_path / "templates" / "digest").mkdir(parents=True, exist_ok=True)
    (tmp_path / "router.yaml").write_text(CONFIG)
    (tmp_path / "rules" / "r.yaml").write_text(textwrap.dedent(rules))
    (tmp_path / "templates" / "t.j2").write_text(TEMPLATE)
    (tmp_path / "templates" / "digest" / "kafka.j2").write_text("{% block value %}{{ count }}{% endblock %}")
    for name, text in (templates or {}).items():
        (tmp_path / "templates" / name).write_text(text)
    return tmp_path / "router.yaml"


def rule(name: str, when: str, events: str = "") -> str:
    events_line = f"    events: {events}\n" if events else ""
    return f'  - name: {name}\n{events_line}    when: "{when}"\n    notify: [{{channel: topic, template: t.j2}}]\n'


def event(data: dict, type_: str = "imm:Task:MediaConvert", id_: str = "e1"):  # type: ignore[no-untyped-def]
    return decode_object({"specversion": "1.0", "id": id_, "source": "acs.imm", "type": type_, "data": data})


def fired(engine: Engine, ev) -> list[str]:  # type: ignore[no-untyped-def]
    return [n.rule for n in engine.route(ev).notifications]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, True),
        (0.0, True),
        ("x", True),
        ([0], True),
        ({"a": 1}, True),
        (True, True),
        (False, False),
        (None, False),
        ("", False),
        ([], False),
        ({}, False),
    ],
)
def test_truthiness_is_jmespaths(value: object, expected: bool) -> None:
    assert truthy(value) is expected


def test_every_matching_rule_fires_and_types_filter(tmp_path: Path) -> None:
    engine = load(
        make(
            tmp_path,
            "rules:\n"
            + rule("a", "Status == 'Failed'", '["imm:Task:*"]')
            + rule("b", "Code", '["imm:Task:MediaConvert"]')
            + rule("c", "`0`")
            + rule("d", "Status == 'Failed'", '["imm:FileMeta:*"]')
            + rule("e", "Missing")
            + rule("f", "imm.outcome == 'failed'")
            + rule("g", "event.type == 'imm:Task:MediaConvert' && glob('task-*', TaskId)"),
        )
    )
    ev = event({"Status": "Failed", "Code": "X", "TaskId": "task-1"})
    assert fired(engine, ev) == ["a", "b", "c", "f", "g"]
    assert fired(engine, event({"Status": "Failed"}, "imm:FileMeta:Index")) == ["c", "d", "f"]


def test_event_globs_are_case_sensitive(tmp_path: Path) -> None:
    engine = load(make(tmp_path, "rules:\n" + rule("a", "`true`", '["imm:task:*"]')))
    assert fired(engine, event({})) == []


def test_a_runtime_error_means_no_match_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = load(make(tmp_path, "rules:\n" + rule("broken", "length(Missing) > `0`") + rule("ok", "`true`")))
    with caplog.at_level(logging.WARNING):
        for i in range(3):
            assert fired(engine, event({}, id_=f"e{i}")) == ["ok"]
    broken = engine.rules.rules[0]
    assert broken.errors == 3
    counted: list[str] = []
    engine.rules.on_error = lambda rule: counted.append(rule.name)
    assert fired(engine, event({}, id_="e9")) == ["ok"]
    assert counted == ["broken"]
    assert sum("broken" in r.getMessage() for r in caplog.records) == 1


def test_indexed_matching_equals_plain_evaluation(tmp_path: Path) -> None:
    """The index keeps exactly the rules plain evaluation matches, and every evaluation error: each rule's
    error count is what evaluating it on every event of its types gives."""
    rnd = random.Random(7)
    projects = [f"p{i}" for i in range(30)]
    p = lambda: rnd.choice(projects)  # noqa: E731
    conditions = [
        lambda: f"ProjectName == '{p()}' && Status == 'Failed'",
        lambda: f"Status == '{rnd.choice(['Failed', 'Succeeded'])}' && Code != ''",
        lambda: f"contains(['{p()}', '{p()}'], ProjectName)",
        lambda: f"ProjectName == '{p()}' || ProjectName == '{p()}'",
        lambda: f"imm.outcome == 'failed' && imm.project == '{p()}'",
        lambda: f"'{p()}' == ProjectName || Code == 'X'",
        lambda: "Suggestion == 'block' && ProjectName == Project",
        lambda: f"ProjectName == '{p()}' && ProjectName == '{p()}'",
        lambda: "!(Status == 'Failed')",
        lambda: "Statistic.SubmitFailure > `0`",
        lambda: f"starts_with(ProjectName, '{p()}')",
        lambda: f"imm.outcome == 'failed' && starts_with(imm.project || '', '{p()}')",
        lambda: f"contains(Message, '{p()}')",
        lambda: f"contains(Message, '{rnd.choice(['ab', 'bc', 'abc', 'cd', 'b'])}')",  # overlapping, nested
        lambda: f"Status == 'Failed' && contains(Tags, '{p()}')",
        lambda: "length(Files[?Error == 'X']) > `0`",
        lambda: "length(Files) >= `1` && Status == 'Failed'",
        lambda: "length(Code) > `0`",
        lambda: f"imm.failed && glob('{p()}*', ProjectName)",
        lambda: f"Statistic.SubmitFailure > `0` && ProjectName == '{p()}'",
        lambda: "Duration > `5`",
        lambda: f"Duration >= `{rnd.choice([3, 5, 7.5, 9])}`",
        lambda: f"`{rnd.choice([4, 9])}` < Duration",
        lambda: f"Duration <= `{rnd.choice([3, 8])}` && Status == 'Failed'",
        lambda: f"Duration < `{rnd.choice([3, 8])}`",
        lambda: f"glob('{p()}*', ProjectName)",
        lambda: "glob('*1', ProjectName)",
        lambda: "ProjectName > 'p2'",
        lambda: "imm.failed",
        lambda: "Tags[0] && Status == 'Failed'",
        lambda: f"length(Missing) > `0` && ProjectName == '{p()}'",
        lambda: f"starts_with(Code, 'X') && ProjectName == '{p()}'",
        # Filters: probed on each element of the list.
        lambda: f"length(Files[?contains(Error, '{p()}')]) > `0`",
        lambda: f"length(imm.failed_files[?contains(error, '{p()}')]) > `0`",
        lambda: f"length(Files[?Error == '{p()}' || Error == 'X']) > `0` && Status == 'Failed'",
        lambda: f"length(Files[?starts_with(Error, '{p()}')].URI) >= `1`",
        lambda: f"Status == 'Failed' && length(Files[?URI && glob('{p()}*', Error)]) > `0`",
        lambda: f"length(Files[?Size > `{rnd.choice([4, 8])}`]) > `1`",
        lambda: f"length(Files[?length(Tags[?contains(@, '{p()}')]) > `0`]) > `0`",
        lambda: "length(Files[?Error]) > `0`",
        lambda: "length(Files[?lower(Error) == 'x']) > `0`",
        lambda: f"length(Files[?contains(['{p()}', '{p()}'], Error)]) > `0` && ProjectName == '{p()}'",
    ]
    types = ['["imm:Task:*"]', '["imm:Task:MediaConvert", "imm:Batch:*"]', ""]
    text = "rules:\n" + "".join(
        rule(f"r{i}", rnd.choice(conditions)().replace('"', '\\"'), rnd.choice(types)) for i in range(300)
    )
    engine = load(make(tmp_path, text))
    compiled = [(r, jmespath.compile(r.spec.when)) for r in engine.rules.rules]
    assert sum(1 for r in engine.rules.rules if not engine.rules._probes[id(r)]) < 60  # most rules are indexed
    expected_errors: dict[str, int] = {}
    for n in range(600):
        data = {
            "ProjectName": rnd.choice([*projects, None, "p1x", 3]),
            "Status": rnd.choice(["Failed", "Succeeded", 1]),
            "Code": rnd.choice(["", "X", "200", None, ["X"]]),
            "Suggestion": rnd.choice(["block", "pass"]),
            "Statistic": {"SubmitFailure": rnd.choice([0, 2, "3", None])},
            "Message": rnd.choice(
                [None, "", f"failed in {p()} now", p(), f"{p()}{p()}", "abcd", "xbcab", [p(), "x"], 7]
            ),
            "Tags": rnd.choice([None, [], [p(), p(), 1], "p1", {"a": 1}]),
            "Files": rnd.choice(
                [
                    *(None, [], [{"Error": "X"}], [{"Error": ""}, {"URI": "u"}], "", {}),
                    [{"Error": f"bad {p()}", "URI": "u", "Size": 9}, {"Error": 3, "Size": "9"}],
                    [{"Error": p(), "Size": 5, "Tags": [p(), 2]}, "x", None, {"Error": p(), "URI": "u"}],
                    [{"Error": [p(), "X"], "Tags": p()}, {"Error": "X", "URI": None}],
                    [{"Error": p(), "URI": "u", "Size": 9, "Tags": [p()]}, {"Error": p(), "Size": 7}],
                ]
            ),
            "Duration": rnd.choice([None, 3, 9, "9", 7.5]),
        }
        ev = event(data, rnd.choice(["imm:Task:MediaConvert", "imm:Batch:Notification", "imm:Task:X"]), f"e{n}")
        root = rule_root(ev)
        expected = []
        for r, expr in compiled:
            if not r.applies_to(ev.type):
                continue
            try:
                if truthy(expr.search(root, options=JMESPATH_OPTIONS)):
                    expected.append(r.name)
            except (JMESPathError, TypeError, ValueError):
                expected_errors[r.name] = expected_errors.get(r.name, 0) + 1
        assert [r.name for r in engine.rules.match(ev, root)] == expected, data
    assert {r.name: r.errors for r in engine.rules.rules if r.errors} == expected_errors
    assert len(expected_errors) > 30  # the mix does raise


def test_filter_rules_meet_only_the_events_whose_elements_can_match(tmp_path: Path) -> None:
    """``length(list[?contains(field, 'x')]) > 0`` is indexed on each element: an event meets the rules of
    the literals its elements contain, not all of them."""
    text = "rules:\n" + "".join(
        rule(f"r{i}", f"length(Files[?contains(Error, 'code-{i:02}')]) > `0`") for i in range(50)
    )
    engine = load(make(tmp_path, text))
    ev = event({"Files": [{"Error": "code-07 in code-41"}, {"Error": "code-07"}]})
    root = rule_root(ev)
    assert [r.name for r in engine.rules.plan(ev.type).candidates(root)] == ["r7", "r41"]
    assert [r.name for r in engine.rules.match(ev, root)] == ["r7", "r41"]
    # An element whose field contains cannot take: every rule is evaluated, and each counts its error.
    ev = event({"Files": [{"Error": "code-07"}, {"Error": 3}]})
    assert engine.rules.match(ev, rule_root(ev)) == []
    assert sum(r.errors for r in engine.rules.rules) == 50


@pytest.mark.parametrize("alphabet", ["ab", "abc", "a", "x.*(é"])
def test_substring_tables_find_exactly_the_literals_a_string_contains(alphabet: str) -> None:
    """The one regular expression over a contains table finds every literal in a string: overlapping,
    nested, sharing starts, with characters re treats specially, and nested too deep for a trie."""
    rnd = random.Random(alphabet)
    word = lambda n: "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, n)))  # noqa: E731
    for _ in range(400):
        literals = {word(5) for _ in range(rnd.randint(1, 12))}
        substrings = _Substrings(literals)
        for _ in range(5):
            value = word(14) + rnd.choice(["", "q", "qq" + word(4)])
            assert substrings.of(value) == {lit for lit in literals if lit in value}, (literals, value)
    deep = _Substrings(["a" * n for n in range(1, 80)])
    assert deep.of("xaaay") == {"a", "aa", "aaa"}


def test_custom_functions(tmp_path: Path) -> None:
    engine = load(
        make(tmp_path, "rules:\n" + rule("a", "lower(Status) == 'failed'") + rule("b", "upper(imm.project) == 'P1'"))
    )
    assert fired(engine, event({"Status": "FAILED", "ProjectName": "p1"})) == ["a", "b"]


@pytest.mark.parametrize(
    ("rules", "templates", "expected"),
    [
        (
            "rules:\n  - name: a\n    when: [oops\n",
            {},
            r"r\.yaml:4: invalid YAML: expected ',' or '\]'.* \(while parsing a flow sequence at line 3\)",
        ),
        ("rules:\n" + rule("a", "Status == "), {}, r"r\.yaml:3: rule 'a': `when` is not valid JMESPath"),
        ("rules:\n" + rule("a", "Status") + "    severity: high\n", {}, r"r\.yaml:5: rules\.0\.severity"),
        ("rules:\n" + rule("a", "Status") + "    colour: red\n", {}, r"r\.yaml:5: rules\.0\.colour: unknown key"),
        (
            "rules:\n  - name: a\n    notify: [{channel: topic, template: t.j2}]\n",
            {},
            r"r\.yaml:2: rules\.0\.when: required key is missing",
        ),
        (
            "rules:\n" + rule("a", "Status") + rule("a", "Code"),
            {},
            r"r\.yaml:5: rule name 'a' is already used at .*r\.yaml:2",
        ),
        (
            "rules:\n  - name: a\n    when: Status\n    notify:\n      - {channel: nope, template: t.j2}\n",
            {},
            r"r\.yaml:5: rule 'a': unknown channel 'nope'; channels in the config: topic",
        ),
        (
            "rules:\n  - name: a\n    when: Status\n    notify:\n      - {channel: topic, template: nope.j2}\n",
            {},
            r"r\.yaml:5: rule 'a': template 'nope.j2' not found",
        ),
        (
            "rules:\n  - name: a\n    when: Status\n    notify:\n      - {channel: topic, template: v.j2}\n",
            {"v.j2": "{% block key %}k{% endblock %}"},
            r"template 'v.j2' has no block value",
        ),
        ("rules:\n" + rule("a", "Status"), {"bad.j2": "line one\n{% if %}"}, r"bad\.j2:2: template syntax error"),
        ("rules:\n  - name: a\n    when: Status\n    when: Code\n", {}, r"r\.yaml:4: duplicate key 'when'"),
        ("rules: 3\n", {}, r"r\.yaml:1: rules: Input should be a valid"),
    ],
)
def test_load_errors_name_file_line_and_fix(tmp_path: Path, rules: str, templates: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load(make(tmp_path, rules, templates))


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = "rules:\n" + rule("a", "Status ==") + rule("b", "Code ==")
    with pytest.raises(ConfigError) as caught:
        load(make(tmp_path, text))
    assert "rule 'a'" in str(caught.value) and "rule 'b'" in str(caught.value)


# Rule sets that read ``imm`` and ``event`` in every way: paths into them (built in part), the documents
# whole (keys(), projections, pipes, to_string) and the root itself.
READING_STYLES = [
    ["imm.outcome == 'failed'", "imm.moderation.suggestion == 'block'", "event.type == 'imm:Task:MediaConvert'"],
    ["imm.uris[0] != null && event.id != null", "imm.failure_reasons[0]", "imm.project == null && imm.nope == null"],
    ["event.wire_format == 'mns'", "event.aliyunregionid == 'cn-hangzhou'", "not_null(imm.error_code, event.time)"],
    ["length(keys(imm)) > `3` && imm.failed"],
    ["imm.*[0] != null", "length(imm | failed_files) > `0`"],
    ["to_string(event) != '' && imm.failed", "contains(keys(event), 'aliyunaccountid')"],
    ["length(@) > `5` && imm.failed", "*.suggestion | [0] == 'block'"],
]


@pytest.mark.parametrize("whens", READING_STYLES)
def test_rules_meet_the_same_events_on_the_root_built_for_them(tmp_path: Path, whens: list[str]) -> None:
    """The rule root is built with only what its rules read of ``imm`` and ``event``: every rule matches
    exactly the seed events it matches on the whole root (plain jmespath as the reference)."""
    engine = load(make(tmp_path, "rules:\n" + "".join(rule(f"r{i}", w) for i, w in enumerate(whens))))
    references = [(r.name, jmespath.compile(r.spec.when)) for r in engine.rules.rules]
    matched = 0
    for label, value, headers in demo_records():
        if label == "poison record":
            continue
        ev = decode(value, headers)
        whole = rule_root(ev)
        expected = [name for name, ref in references if truthy(ref.search(whole, options=JMESPATH_OPTIONS))]
        partial = decode(value, headers)  # its view not built yet
        assert [r.name for r in engine.rules.match(partial, engine.rules.root_for(partial))] == expected, ev.id
        matched += bool(expected)
    assert matched > 3


def test_the_root_holds_only_what_the_rules_read(tmp_path: Path) -> None:
    whens = ["imm.outcome == 'failed' && event.type != 'x'", "imm.moderation.suggestion == 'block'"]
    engine = load(make(tmp_path, "rules:\n" + "".join(rule(f"r{i}", w) for i, w in enumerate(whens))))
    ev = event({"Status": "Failed", "ProjectName": "p"})
    root = engine.rules.root_for(ev)
    assert root["imm"] == {"outcome": "failed", "moderation": None} and root["event"] == {"type": ev.type}
    assert root["ProjectName"] == "p"
    # What reads the whole root (templates, group keys) gets it whole.
    assert engine.route(ev).root == rule_root(ev) and set(rule_root(ev)["imm"]) == VIEW_KEYS


@pytest.mark.parametrize(
    ("when", "imm", "event_keys"),
    [
        ("imm.outcome == 'failed'", {"outcome"}, set()),
        ("imm.moderation.suggestion == 'block' && event.type == 'x'", {"moderation"}, {"type"}),
        ("length(Files[?imm.outcome]) > `0`", set(), set()),  # inside a filter: an element's field
        ("keys(imm)", None, set()),
        ("imm.*", None, set()),
        ("imm | outcome", None, set()),
        ("event.id && to_string(event)", set(), None),
        ("@.imm.outcome", None, None),
        ("length(@) > `1`", None, None),
        ("data.imm.outcome", set(), set()),  # a payload field's own key
    ],
)
def test_root_reads(when: str, imm: set[str] | None, event_keys: set[str] | None) -> None:
    reads = root_reads(jmespath.compile(when).parsed)
    assert reads.imm == (None if imm is None else frozenset(imm))
    assert reads.event == (None if event_keys is None else frozenset(event_keys))
