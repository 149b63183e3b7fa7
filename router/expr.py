"""JMESPath compiled to Python closures.

``compile(text, functions=...)`` parses with jmespath itself (same grammar, same parse errors) and turns
the tree into nested closures once, so evaluating an expression is a few direct calls instead of
jmespath's tree interpreter dispatching on every node of every event. ``.search(document)`` returns
exactly what ``jmespath.search(text, document, options=Options(custom_functions=functions))`` returns:
the same values, types and errors (a differential test holds it to that).

Where the interpreter's semantics are subtle they are kept on purpose: truthiness by equality with
``''``/``[]``/``{}``, ``0``/``1`` never equal to ``false``/``true``, ``!0`` false, ordering only between
numbers or strings (mixing them raises TypeError as the interpreter does), projections dropping nulls,
functions type-checked by Python type name. Function calls whose arguments pass a precomputed type check
call the function directly; anything else goes through ``Functions.call_function`` for its exact error.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from numbers import Number
from typing import Any, cast

import jmespath
from jmespath import functions as jp_functions
from jmespath.visitor import _Expression

Fn = Callable[[Any], Any]

__all__ = ["Expression", "comparable", "compile", "compile_tree", "field_chain", "is_number", "truthy"]


class _Calls:
    """What jmespath's expression references (``&key``, handed to ``sort_by`` and the like) call back:
    ``visit(expression, value)``, here with a compiled closure as the expression."""

    @staticmethod
    def visit(expression: Fn, value: Any) -> Any:
        return expression(value)


_CALLS = _Calls()


class Expression:
    """A compiled expression: ``text`` as written, ``parsed`` jmespath's tree (for indexing), ``search``."""

    __slots__ = ("parsed", "search", "text")

    def __init__(self, text: str, parsed: dict[str, Any], search: Fn) -> None:
        self.text = text
        self.parsed = parsed
        self.search = search

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"


def compile(expression: str, functions: jp_functions.Functions | None = None) -> Expression:
    """Parse ``expression`` (raising jmespath's own ParseError / LexerError) and compile it."""
    parsed = cast(dict[str, Any], jmespath.compile(expression).parsed)
    return Expression(expression, parsed, compile_tree(parsed, functions))


def compile_tree(parsed: dict[str, Any], functions: jp_functions.Functions | None = None) -> Fn:
    """The closure for an already parsed tree (or subtree) of jmespath's."""
    return _Compiler(functions or jp_functions.Functions()).build(parsed)


# --- semantics shared by the closures ------------------------------------------------------------


def is_number(x: Any) -> bool:
    return isinstance(x, Number) and not isinstance(x, bool)


def truthy(value: Any) -> bool:
    """JMESPath truthiness: false, null, "", [], {} are false; everything else (0 too) is true. (The
    interpreter compares with '', [], {}; for JSON values that is "empty str, list or dict".)"""
    if value is None or value is False:
        return False
    if isinstance(value, str | list | dict):
        return len(value) > 0
    return True


def _equals(x: Any, y: Any) -> bool:
    if is_number(x) and x in (0, 1):
        return not isinstance(y, bool) and bool(x == y)
    if is_number(y) and y in (0, 1):
        return not isinstance(x, bool) and bool(x == y)
    return bool(x == y)


def comparable(x: Any) -> bool:
    return isinstance(x, str) or is_number(x)


_ORDERING: dict[str, Callable[[Any, Any], Any]] = {
    "lt": operator.lt,
    "gt": operator.gt,
    "lte": operator.le,
    "gte": operator.ge,
}


class _Compiler:
    def __init__(self, functions: jp_functions.Functions) -> None:
        self.functions = functions
        cls = type(functions)
        base = jp_functions.Functions
        # Direct calls are only safe when argument checking is jmespath's own.
        self.direct_calls = all(
            getattr(cls, name) is getattr(base, name)
            for name in ("call_function", "_validate_arguments", "_type_check", "_type_check_single")
        )

    def build(self, node: dict[str, Any]) -> Fn:
        method: Callable[[dict[str, Any]], Fn] | None = getattr(self, f"_{node['type']}", None)
        if method is None:
            raise NotImplementedError(node["type"])
        return method(node)

    # paths

    def _field(self, node: dict[str, Any]) -> Fn:
        return _get_path((node["value"],))

    def _subexpression(self, node: dict[str, Any]) -> Fn:
        keys = field_chain(node)
        if keys is not None:
            return _get_path(keys)
        return self._chain(node)

    def _chain(self, node: dict[str, Any]) -> Fn:
        steps = [self.build(child) for child in node["children"]]
        if len(steps) == 2:
            first, second = steps

            def two(value: Any) -> Any:
                return second(first(value))

            return two

        def chain(value: Any) -> Any:
            for step in steps:
                value = step(value)
            return value

        return chain

    _pipe = _chain
    _index_expression = _chain

    def _current(self, node: dict[str, Any]) -> Fn:
        return _identity

    _identity = _current

    def _literal(self, node: dict[str, Any]) -> Fn:
        literal = node["value"]
        return lambda value: literal

    def _index(self, node: dict[str, Any]) -> Fn:
        position = node["value"]

        def index(value: Any) -> Any:
            if not isinstance(value, list):
                return None
            try:
                return value[position]
            except IndexError:
                return None

        return index

    def _slice(self, node: dict[str, Any]) -> Fn:
        part = slice(*node["children"])

        def sliced(value: Any) -> Any:
            return value[part] if isinstance(value, list) else None

        return sliced

    # comparisons and logic

    def _comparator(self, node: dict[str, Any]) -> Fn:
        op = node["value"]
        left_node, right_node = node["children"]
        left, right = self.build(left_node), self.build(right_node)
        if op in ("eq", "ne"):
            equal = self._equality(left_node, right_node, left, right)
            if op == "eq":
                return equal
            return lambda value: not equal(value)
        compare = _ORDERING[op]

        def ordering(value: Any) -> Any:
            a, b = left(value), right(value)
            if not (comparable(a) and comparable(b)):
                return None
            return compare(a, b)

        return ordering

    def _equality(self, left_node: dict[str, Any], right_node: dict[str, Any], left: Fn, right: Fn) -> Fn:
        for path_fn, literal_node in ((left, right_node), (right, left_node)):
            if literal_node["type"] != "literal":
                continue
            literal = literal_node["value"]
            # Plain == is the interpreter's equality unless 0/1/true/false are involved.
            if literal is None or isinstance(literal, str) or (is_number(literal) and literal not in (0, 1)):
                return lambda value: bool(path_fn(value) == literal)
        return lambda value: _equals(left(value), right(value))

    def _and_expression(self, node: dict[str, Any]) -> Fn:
        left, right = (self.build(c) for c in node["children"])

        def both(value: Any) -> Any:
            matched = left(value)
            if not truthy(matched):
                return matched
            return right(value)

        return both

    def _or_expression(self, node: dict[str, Any]) -> Fn:
        left, right = (self.build(c) for c in node["children"])

        def either(value: Any) -> Any:
            matched = left(value)
            if not truthy(matched):
                return right(value)
            return matched

        return either

    def _not_expression(self, node: dict[str, Any]) -> Fn:
        child = self.build(node["children"][0])

        def negate(value: Any) -> bool:
            result = child(value)
            if is_number(result):
                return False  # !0 is false: 0 is not a false value in JMESPath; other numbers are true
            return not result

        return negate

    # projections and selections

    def _projection(self, node: dict[str, Any]) -> Fn:
        base, each = (self.build(c) for c in node["children"])

        def project(value: Any) -> Any:
            items = base(value)
            if not isinstance(items, list):
                return None
            return [r for r in map(each, items) if r is not None]

        return project

    def _value_projection(self, node: dict[str, Any]) -> Fn:
        base, each = (self.build(c) for c in node["children"])

        def project_values(value: Any) -> Any:
            items = base(value)
            try:
                items = items.values()
            except AttributeError:
                return None
            return [r for r in map(each, items) if r is not None]

        return project_values

    def _filter_projection(self, node: dict[str, Any]) -> Fn:
        base, each, condition = (self.build(c) for c in node["children"])

        def filtered(value: Any) -> Any:
            items = base(value)
            if not isinstance(items, list):
                return None
            collected = []
            for item in items:
                if truthy(condition(item)):
                    current = each(item)
                    if current is not None:
                        collected.append(current)
            return collected

        return filtered

    def _flatten(self, node: dict[str, Any]) -> Fn:
        base = self.build(node["children"][0])

        def flatten(value: Any) -> Any:
            items = base(value)
            if not isinstance(items, list):
                return None
            merged: list[Any] = []
            for item in items:
                if isinstance(item, list):
                    merged.extend(item)
                else:
                    merged.append(item)
            return merged

        return flatten

    def _multi_select_list(self, node: dict[str, Any]) -> Fn:
        parts = [self.build(c) for c in node["children"]]

        def select_list(value: Any) -> Any:
            if value is None:
                return None
            return [part(value) for part in parts]

        return select_list

    def _multi_select_dict(self, node: dict[str, Any]) -> Fn:
        parts = [(c["value"], self.build(c["children"][0])) for c in node["children"]]

        def select_dict(value: Any) -> Any:
            if value is None:
                return None
            return {key: part(value) for key, part in parts}

        return select_dict

    # functions

    def _expref(self, node: dict[str, Any]) -> Fn:
        # jmespath's own class: functions type-check arguments by Python type name.
        reference = _Expression(cast(Any, self.build(node["children"][0])), cast(Any, _CALLS))
        return lambda value: reference

    def _function_expression(self, node: dict[str, Any]) -> Fn:
        name = node["value"]
        args = [self.build(c) for c in node["children"]]
        call = self.functions.call_function
        direct = self._direct(name, len(args))
        if direct is None:
            return lambda value: call(name, [a(value) for a in args])
        function, allowed = direct

        def call_checked(value: Any) -> Any:
            resolved = [a(value) for a in args]
            for arg, names in zip(resolved, allowed, strict=False):
                if names is not None and type(arg).__name__ not in names:
                    return call(name, resolved)  # raises the interpreter's type error
            return function(*resolved)

        return call_checked

    def _direct(self, name: str, arity: int) -> tuple[Callable[..., Any], list[frozenset[str] | None]] | None:
        """The bound function and, per argument, the Python type names that pass jmespath's check (None:
        any), when a call with ``arity`` arguments can skip ``call_function``; else None."""
        spec = self.functions.FUNCTION_TABLE.get(name) if self.direct_calls else None
        if spec is None:
            return None  # unknown: call_function raises UnknownFunctionError when evaluated
        signature = spec["signature"]
        if signature and signature[-1].get("variadic"):
            if arity < len(signature):
                return None
            signature = [*signature, *[{"types": []}] * (arity - len(signature))]  # extras go unchecked
        elif arity != len(signature):
            return None
        allowed: list[frozenset[str] | None] = []
        for argument in signature:
            types = argument["types"]
            if any("-" in t for t in types):
                return None  # typed arrays: element checks stay with call_function
            allowed.append(frozenset(n for t in types for n in jp_functions.REVERSE_TYPES_MAP[t]) if types else None)
        function = spec["function"].__get__(self.functions)
        return function, allowed


def _identity(value: Any) -> Any:
    return value


def field_chain(node: dict[str, Any]) -> tuple[str, ...] | None:
    """The keys of ``a.b.c`` (fields only, however nested), else None."""
    if node["type"] == "field":
        return (node["value"],)
    if node["type"] != "subexpression":
        return None
    keys: list[str] = []
    for child in node["children"]:
        sub = field_chain(child)
        if sub is None:
            return None
        keys.extend(sub)
    return tuple(keys)


def _get_path(keys: tuple[str, ...]) -> Fn:
    # value.get with AttributeError -> None is the interpreter's field lookup: anything but a mapping
    # (a list, a string, null) has no fields.
    if len(keys) == 1:
        (a,) = keys

        def get1(value: Any) -> Any:
            try:
                return value.get(a)
            except AttributeError:
                return None

        return get1
    if len(keys) == 2:
        a, b = keys

        def get2(value: Any) -> Any:
            try:
                return value.get(a).get(b)
            except AttributeError:
                return None

        return get2

    def get_n(value: Any) -> Any:
        try:
            for key in keys:
                value = value.get(key)
            return value
        except AttributeError:
            return None

    return get_n
