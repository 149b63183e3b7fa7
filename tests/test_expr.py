"""router.expr.compile is held to jmespath's own interpreter: for generated expressions and documents, and
for every expression the shipped rules and the README contain, the compiled ``search`` returns the same
value with the same types, or raises the same error with the same message."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path
from typing import Any

import jmespath
import pytest
import yaml
from jmespath.exceptions import JMESPathError
from jmespath.visitor import Options, _Expression

from router import expr
from router.rules import JMESPATH_OPTIONS, _Functions

ROOT = Path(__file__).resolve().parent.parent

KEYS = ["a", "b", "c", "Status", "Files", "imm", "x y"]
FUNCTIONS: dict[str, int] = {  # name -> the arity it is usually called with (calls vary it too)
    "abs": 1, "avg": 1, "ceil": 1, "contains": 2, "ends_with": 2, "floor": 1, "join": 2, "keys": 1,
    "length": 1, "max": 1, "merge": 2, "min": 1, "not_null": 2, "reverse": 1, "sort": 1, "starts_with": 2,
    "sum": 1, "to_array": 1, "to_number": 1, "to_string": 1, "type": 1, "values": 1, "lower": 1, "upper": 1,
    "glob": 2, "nosuch": 1,
}  # fmt: skip
EXPREF_FUNCTIONS = ["sort_by", "min_by", "max_by", "map"]
LITERALS = [
    "'Failed'", "''", "'a'", "`0`", "`1`", "`2`", "`-1`", "`1.5`", "`0.0`", "`true`", "`false`", "`null`",
    '`"a"`', "`[]`", "`[1, 2]`", "`[0, true]`", "`{}`", '`{"a": 1}`', "'*'", "'a*'", "'[?'",
]  # fmt: skip


def key(rng: random.Random) -> str:
    name = rng.choice(KEYS)
    return f'"{name}"' if " " in name else name


def expression(rng: random.Random, depth: int = 0) -> str:
    """A random expression; about one in ten does not parse (which must be the same error too)."""
    if depth > 3 or rng.random() < 0.25:
        return rng.choice([key(rng), key(rng), "@", rng.choice(LITERALS)])
    sub = lambda: expression(rng, depth + 1)  # noqa: E731
    kind = rng.randrange(22)
    match kind:
        case 0 | 1:
            return f"{sub()}.{key(rng)}"
        case 2:
            return f"{sub()}[{rng.choice(['0', '1', '-1', '5'])}]"
        case 3:
            return f"{sub()}[{rng.choice(['1:', ':2', '::-1', '::2', '-2:', '1:3:1', '5:'])}]"
        case 4:
            return f"{sub()}[*].{key(rng)}"
        case 5:
            return f"{sub()}.*"
        case 6:
            return f"{sub()}[]"
        case 7:
            return f"{sub()}[?{sub()}]"
        case 8:
            return f"{sub()} | {sub()}"
        case 9:
            return f"{sub()} || {sub()}"
        case 10:
            return f"{sub()} && {sub()}"
        case 11:
            return f"!{sub()}"
        case 12:
            return f"({sub()})"
        case 13 | 14:
            op = rng.choice(["==", "!=", "<", "<=", ">", ">="])
            return f"{sub()} {op} {sub()}"
        case 15:
            return f"[{sub()}, {sub()}]"
        case 16:
            return f"{{k: {sub()}, j: {sub()}}}"
        case 17 | 18 | 19:
            name, arity = rng.choice(list(FUNCTIONS.items()))
            arity = max(0, arity + rng.choice([0, 0, 0, 0, -1, 1]))
            return f"{name}({', '.join(sub() for _ in range(arity))})"
        case 20:
            name = rng.choice(EXPREF_FUNCTIONS)
            if name == "map":
                return f"map(&{sub()}, {sub()})"
            return f"{name}({sub()}, &{sub()})"
        case _:
            return f"{sub()}[?{key(rng)} {rng.choice(['==', '<', '!='])} {rng.choice(LITERALS)}]"


def value(rng: random.Random, depth: int = 0) -> Any:
    scalars = [0, 1, 2, -3, 0.0, 1.5, True, False, None, "", "a", "Failed", "ab*", "b"]
    if depth > 2 or rng.random() < 0.4:
        return rng.choice(scalars)
    if rng.random() < 0.5:
        return [value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(KEYS): value(rng, depth + 1) for _ in range(rng.randrange(5))}


def document(rng: random.Random) -> dict[str, Any]:
    return {k: value(rng) for k in KEYS if rng.random() < 0.8}


def same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, _Expression):
        return True  # a bare &expr: the same class, its insides are each implementation's own
    return bool(a == b)


def outcome(search: Any, doc: Any) -> tuple[str, Any]:
    try:
        return "value", search(doc)
    except (JMESPathError, TypeError, ValueError, AttributeError, KeyError) as exc:
        return "error", (type(exc), str(exc))


def assert_same(text: str, doc: Any, functions: Any = None) -> None:
    options = Options(custom_functions=functions) if functions else None
    reference = jmespath.compile(text)
    compiled = expr.compile(text, functions=functions)
    want = outcome(lambda d: reference.search(d, options=options), doc)
    got = outcome(compiled.search, doc)
    assert want[0] == got[0], f"{text!r} on {doc!r}: jmespath gave {want}, compiled gave {got}"
    if want[0] == "error":
        assert want[1] == got[1], f"{text!r} on {doc!r}: jmespath raised {want[1]}, compiled raised {got[1]}"
    else:
        assert same(want[1], got[1]), f"{text!r} on {doc!r}: jmespath gave {want[1]!r}, compiled gave {got[1]!r}"


def test_generated_expressions_match_the_interpreter() -> None:
    rng = random.Random(20261201)
    functions = _Functions()
    compiled = errors = 0
    for _ in range(6_000):
        text = expression(rng)
        try:
            jmespath.compile(text)
        except JMESPathError as exc:
            with pytest.raises(type(exc)) as raised:
                expr.compile(text)
            assert str(raised.value) == str(exc)
            continue
        compiled += 1
        for _ in range(4):
            doc = document(rng)
            assert_same(text, doc, functions)
            errors += outcome(jmespath.compile(text).search, doc)[0] == "error"
    # The generator must exercise both sides: thousands of valid expressions, some of them raising.
    assert compiled > 4_000
    assert errors > 500


@pytest.mark.parametrize(
    "text",
    [
        "a.b.c", "a[0].b", "a[-1]", "a[5]", "a[1:]", "a[::-1]", "a[*].b", "a.*.b", "a[]", "a[][]",
        "a[?b == `1`].c", "a[?b]", "a | b", "a || b", "a && b", "!a", "a == `0`", "a == `false`",
        "a == `1`", "a == `true`", "`0` == a", "a != `0`", "a < b", "a <= `1`", "'a' < 'b'", "a > 'b'",
        "[a, b]", "{k: a, j: b}", "length(a)", "contains(a, 'x')", "contains(a, `1`)", "starts_with(a, 'F')",
        "sort_by(a, &b)", "min_by(a, &b)", "max_by(a, &b)", "map(&b, a)", "merge(a, b)", "not_null(a, b)",
        "sum(a)", "avg(a)", "max(a)", "join(', ', a)", "to_string(a)", "to_number(a)", "type(a)", "keys(a)",
        "values(a)", "reverse(a)", "abs(a)", "&a", "glob('Fa*', a)", "lower(a)", "upper(a)", "nosuch(a)",
        "length(a, b)", "length()", "merge(a, b, c)", "@", "`null`", "a.b | [0]", "a[?b > `0`] | length(@)",
    ],
)  # fmt: skip
@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"a": None},
        {"a": 0, "b": 1},
        {"a": 1, "b": True},
        {"a": False},
        {"a": "Failed", "b": "Failed"},
        {"a": "x", "b": 2},
        {"a": [], "b": {}},
        {"a": [1, 2, 3], "b": {"c": 1}},
        {"a": [{"b": 1, "c": "x"}, {"b": 0}, {"b": None}, 5, "s"], "b": [{"c": 1}], "c": {"d": 1}},
        {"a": {"b": {"c": "deep"}, "x": [1, [2, [3]]]}, "b": {"k": 2}},
        {"a": ["b", "a", "c"], "b": [1, "a"]},
        {"a": [[1, 2], 3, [4, [5]]]},
        {"a": [1.5, -2, 0.0]},
        {"a": {"b": 2, "c": [0, 1]}},
    ],
)
def test_documented_edge_cases(text: str, doc: Any) -> None:
    assert_same(text, doc, _Functions())


def shipped_and_documented_expressions() -> list[str]:
    found: list[str] = []
    for path in sorted((ROOT / "rules").rglob("*.yaml")):
        for rule in (yaml.safe_load(path.read_text()) or {}).get("rules", []):
            found.append(rule["when"])
            for target in rule.get("notify", []):
                found.extend(target.get("group_by") or [])
                found.extend((target.get("throttle") or {}).get("key") or [])
    readme = (ROOT / "README.md").read_text()
    # `when: "..."` and `when: '...'` in YAML examples, and inline `...` code that parses as a condition.
    found.extend(m.group(2) for m in re.finditer(r"when: ([\"'])(.+?)\1\s*$", readme, re.M))
    for code in re.findall(r"`([^`\n]+)`", readme):
        if any(op in code for op in ("==", "!=", "contains(", "starts_with(", "glob(", "length(")):
            try:
                jmespath.compile(code)
            except JMESPathError:
                continue
            found.append(code)
    return sorted(set(found))


def test_every_shipped_and_documented_expression_matches_on_every_seed_event() -> None:
    from router.decode import decode
    from router.embedded.demo import demo_records
    from router.rules import rule_root

    texts = shipped_and_documented_expressions()
    assert len(texts) > 15
    roots = [rule_root(decode(value, headers)) for _, value, headers in demo_records()[:-1]]
    assert len(roots) > 60
    functions = JMESPATH_OPTIONS.custom_functions
    for text in texts:
        for root in roots:
            assert_same(text, root, functions)


def test_parse_errors_are_jmespaths_own() -> None:
    for text in ["a ==", "a[?", "foo(", "'unterminated", "a..b", "a[0", "a[?b == ]"]:
        with pytest.raises(JMESPathError) as want:
            jmespath.compile(text)
        with pytest.raises(type(want.value)) as got:
            expr.compile(text)
        assert str(got.value) == str(want.value)


def test_overridden_argument_checking_is_respected() -> None:
    """A Functions class that changes how arguments are checked never gets the direct-call shortcut."""
    from jmespath import functions

    class Lenient(functions.Functions):
        def _type_check(self, actual: Any, signature: Any, function_name: str) -> None:
            return None

    for text in ["length(a)", "starts_with(a, 'x')", "contains(a, 'x')"]:
        assert_same(text, {"a": 5}, Lenient())  # the interpreter lets these through to Python's own errors
