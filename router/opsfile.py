"""Loading files written by people (config, rules, rule tests): YAML with line numbers, ``${VAR}``
expansion, and pydantic errors turned into ``file:line: what to fix`` messages."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

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


def line_of(doc: Any, loc: Iterable[int | str]) -> int | None:
    """The line of the deepest node on ``loc`` (a pydantic error location) that the document has."""
    line: int | None = getattr(doc, "line", None)
    node = doc
    for part in loc:
        if isinstance(node, LineDict) and part in node:
            line = node.key_lines.get(part, line)
            node = node[part]
        elif isinstance(node, LineList) and isinstance(part, int) and 0 <= part < len(node):
            line = node.item_lines[part]
            node = node[part]
        else:
            break
        line = getattr(node, "line", line)
    return line


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


def describe_errors(exc: ValidationError, doc: Any, path: Path, prefix: tuple[int | str, ...] = ()) -> str:
    """One ``file:line: field: problem`` line per pydantic error, for people to act on."""
    lines = []
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        elif err["type"] == "missing":
            msg = "required key is missing; add it"
        line = line_of(doc, loc)
        lines.append(f"{path}{':' + str(line) if line else ''}: {where}: {msg}")
    return "\n".join(lines)


def validate(model: type[M], doc: Any, path: Path) -> M:
    """Validate a parsed document against a model, with file:line errors."""
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, doc, path)) from exc
