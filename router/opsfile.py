"""Loading files written by people (config, rules, rule tests): YAML with line numbers, ``${VAR}``
expansion, and pydantic errors turned into ``file:line: what to fix`` messages."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from router.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class LineDict(dict[Any, Any]):
    """A YAML mapping that remembers the line of itself and of each of its keys."""

    line: int = 0
    key_lines: dict[Any, int]


class LineList(list[Any]):
    """A YAML sequence that remembers the line of itself and of each of its items."""

    line: int = 0
    item_lines: list[int]


class _Loader(yaml.SafeLoader):
    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # An alias expands to a copy of its anchor wherever it is used: nested aliases ("billion laughs")
        # grow exponentially, so a few hundred bytes would make every later pass over the document run
        # for minutes. Ops files are short; write the value out.
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise ConfigError(
                f"YAML alias *{event.anchor} is not allowed (aliases can expand without bound); write the value out",
                path=self.name,
                line=event.start_mark.line + 1,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> LineDict:
        result = LineDict()
        result.line = node.start_mark.line + 1
        result.key_lines = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in result.key_lines:
                raise ConfigError(
                    f"duplicate key {key!r} (first at line {result.key_lines[key]}); remove one of them",
                    path=self.name,
                    line=key_node.start_mark.line + 1,
                )
            result.key_lines[key] = key_node.start_mark.line + 1
            result[key] = self.construct_object(value_node, deep=True)
        return result

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> LineList:
        result = LineList(self.construct_object(child, deep=True) for child in node.value)
        result.line = node.start_mark.line + 1
        result.item_lines = [child.start_mark.line + 1 for child in node.value]
        return result


_Loader.add_constructor("tag:yaml.org,2002:map", _Loader.construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:seq", _Loader.construct_sequence)


def load_yaml(path: Path, text: str | None = None) -> Any:
    """Parse one YAML document; syntax errors name file:line."""
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read file: {exc}", path=str(path)) from exc
    loader = _Loader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        began = ""
        if exc.context_mark and exc.problem_mark and exc.context_mark.line != exc.problem_mark.line:
            began = f" ({exc.context} at line {exc.context_mark.line + 1})"
        raise ConfigError(
            f"invalid YAML: {exc.problem or exc}{began}; fix the syntax", path=str(path), line=line
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", path=str(path)) from exc
    finally:
        loader.dispose()


def did_you_mean(word: str, known: Iterable[str], *, suffix: str = "") -> str:
    """``; did you mean 'x'?`` for the closest of ``known`` (case differences too), or ``""``."""
    choices = sorted(str(k) for k in known)
    close = [c for c in choices if c.lower() == word.lower()] or difflib.get_close_matches(word, choices, 1, 0.75)
    return f"; did you mean {close[0] + suffix!r}?" if close else ""


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(doc: Any, path: Path, env: dict[str, str] | None = None) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in string values (not keys) from the environment.

    Expansion happens after parsing so a variable's value can never change the YAML structure."""
    environ = os.environ if env is None else env

    def expand(value: Any, line: int | None) -> Any:
        if isinstance(value, str):

            def sub(match: re.Match[str]) -> str:
                name, default = match.group(1), match.group(2)
                if name in environ:
                    return environ[name]
                if default is not None:
                    return default
                raise ConfigError(
                    f"environment variable {name} is not set; set it or write ${{{name}:-default}}",
                    path=str(path),
                    line=line,
                )

            return _ENV.sub(sub, value)
        if isinstance(value, LineDict):
            for key in list(value):
                value[key] = expand(value[key], value.key_lines.get(key, value.line))
        elif isinstance(value, LineList):
            for i, item in enumerate(value):
                value[i] = expand(item, value.item_lines[i])
        return value

    return expand(doc, getattr(doc, "line", None))


def _unwrap(tp: Any) -> list[Any]:
    """The concrete types an annotation allows (Annotated and None stripped, unions spread, and the base
    of a family tagged by ``type`` — ChannelConfigBase, whose members plugins add — its tagged subclasses)."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, UnionType):
        return [t for arg in get_args(tp) if arg is not type(None) for t in _unwrap(arg)]
    if isinstance(tp, type) and issubclass(tp, BaseModel) and "type" in tp.model_fields and not _tags(tp):
        family = [m for m in _descendants(tp) if _tags(m)]
        return family or [tp]
    return [tp]


def _descendants(model: type[BaseModel]) -> list[type[BaseModel]]:
    found = []
    for sub in model.__subclasses__():
        found += [sub, *_descendants(sub)]
    return found


def _step(tp: Any, part: int | str) -> Any:
    """The type at ``part`` of a pydantic error location inside a value of type ``tp``, or None."""
    for option in _unwrap(tp):
        if isinstance(option, type) and issubclass(option, BaseModel):
            for name, info in option.model_fields.items():
                if part in (name, info.alias):
                    return info.annotation
        elif get_origin(option) is dict and isinstance(part, str):
            return get_args(option)[1]
        elif get_origin(option) in (tuple, list) and isinstance(part, int):
            return get_args(option)[0]
    # A discriminated union's tag segment (``channels.x.dingtalk``) selects the member.
    tagged = [m for m in _unwrap(tp) if isinstance(m, type) and issubclass(m, BaseModel) and part in _tags(m)]
    return tagged[0] if tagged else None


def _tags(model: type[BaseModel]) -> tuple[Any, ...]:
    tag = model.model_fields.get("type")
    return get_args(tag.annotation) if tag is not None else ()


def _keys_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys the model accepts in the mapping at ``loc`` (for a did-you-mean)."""
    tp: Any = model
    for part in loc:
        tp = _step(tp, part)
        if tp is None:
            return []
    keys = []
    for option in _unwrap(tp):
        if isinstance(option, type) and issubclass(option, BaseModel):
            keys += [info.alias or name for name, info in option.model_fields.items()]
    return keys


def _as_written(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """A pydantic error location without the segments pydantic adds itself: a discriminated union's tag
    (``channels.x.dingtalk.url``) and union member names (``int``, ``function-after[…]``)."""
    tp: Any = model
    kept: list[int | str] = []
    for part in loc:
        if isinstance(part, str) and "[" in part:
            continue
        options = _unwrap(tp) if tp is not None else []
        models = [o for o in options if isinstance(o, type) and issubclass(o, BaseModel)]
        member = next((m for m in models if part in _tags(m)), None) if len(models) > 1 else None
        if member is not None:
            tp = member
            continue
        kept.append(part)
        tp = _step(tp, part) if tp is not None else None
    return tuple(kept)


def _located(doc: Any, loc: tuple[int | str, ...]) -> int | None:
    """The line of the deepest part of ``loc`` the document has (a missing key: its mapping's line)."""
    line: int | None = getattr(doc, "line", None)
    node = doc
    for i, part in enumerate(loc):
        if isinstance(node, LineDict) and part in node:
            line = node.key_lines.get(part, line)
            node = node[part]
        elif isinstance(node, LineList) and isinstance(part, int) and 0 <= part < len(node):
            line = node.item_lines[part]
            node = node[part]
        else:
            break
        if i < len(loc) - 1:  # a mapping or list on the way: where its content starts
            line = getattr(node, "line", line)
    return line


def describe_errors(
    exc: ValidationError,
    doc: Any,
    path: Path,
    model: type[BaseModel] | None = None,
    from_env: Callable[[tuple[int | str, ...]], str | None] = lambda loc: None,
) -> str:
    """One ``file:line: field: problem`` line per pydantic error, for people to act on. ``model`` gives a
    did-you-mean for unknown keys; ``from_env`` names the environment variable a location came from."""
    lines = []
    for err in exc.errors():
        raw = tuple(err["loc"])
        loc = _as_written(model, raw) if model is not None else raw
        line = _located(doc, loc)
        where = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            hint = did_you_mean(str(raw[-1]), _keys_at(model, raw[:-1])) if model is not None else ""
            msg = f"unknown key{hint or '; remove it or check its spelling'}"
        elif err["type"] == "missing":
            msg = "required key is missing; add it"
        variable = from_env(loc)
        if variable:
            lines.append(f"environment variable {variable}: {where}: {msg}")
        else:
            lines.append(f"{path}{':' + str(line) if line else ''}: {where}: {msg}")
    return "\n".join(lines)


def line_of(doc: Any, loc: Iterable[int | str]) -> int | None:
    """The line of the deepest node on ``loc`` (a pydantic error location) that the document has."""
    return _located(doc, tuple(loc))


def validate(model: type[M], doc: Any, path: Path) -> M:
    """Validate a parsed document against a model, with file:line errors."""
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, doc, path, model)) from exc
