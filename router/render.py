"""Templates: every file under templates_dir compiled at load in Jinja's sandbox.

One template file renders every part its channel needs as named blocks (``{% block subject %}``):
email: subject, text, html; DingTalk: title, text, button_title, button_url; Kafka: key, value;
webhook: body. The html block is rendered with HTML autoescaping, the others as plain text.

Rendering has a budget, enforced inside the sandbox: a render (all the blocks of one notification) ends
with a RenderError naming the template once it runs past ``timeout_seconds`` (checked at every ``{% for %}``
iteration, call and output chunk) or produces more than ``max_chars`` (checked on output and on
``*``, ``**``, ``+`` and ``~``, which are therefore never folded at load either).
"""

from __future__ import annotations

import re
import threading
import time
import zoneinfo
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
from jinja2 import FileSystemLoader, StrictUndefined, Template, TemplateError, TemplateSyntaxError, nodes
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from router import jsoncodec
from router.channels.base import ChannelConfigBase
from router.config import Settings
from router.errors import ConfigError, RenderError
from router.imm import VIEW_KEYS
from router.opsfile import did_you_mean

TEMPLATE_SUFFIXES = (".j2", ".jinja", ".jinja2")
SEVERITY_ICON = {"critical": "🔴", "warning": "🟠", "info": "🔵"}


def humanize_duration(seconds: Any) -> str:
    """850 ms, 42s, 3m 5s, 2h 1m, 3d 4h."""
    if seconds is None:
        return ""
    try:
        total = float(seconds)
    except (TypeError, ValueError):
        return str(seconds)
    if total < 1:
        return f"{round(total * 1000)} ms"
    whole = int(total)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    units = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{n}{u}" for n, u in units if n][:2]
    return " ".join(shown) or "0s"


def oss_console_url(uri: Any, region: Any = None) -> str:
    """Where a link to ``uri`` may point: the OSS console page of an ``oss://bucket/key`` object, an
    http(s) URI itself, or "" (no link) for anything else (``javascript:``, ``data:``, a bare path)."""
    if not isinstance(uri, str):
        return ""
    if uri.startswith("oss://"):
        bucket, _, key = uri[len("oss://") :].partition("/")
        region_part = quote(f"oss-{region}" if region else "oss-cn-hangzhou", safe="")
        return (
            f"https://oss.console.aliyun.com/bucket/{region_part}/{quote(bucket, safe='')}/object"
            f"?path={quote(key, safe='')}"
        )
    parts = urlsplit(uri)
    if parts.scheme.lower() in ("http", "https") and parts.netloc:
        # Percent-encode what could end a markdown link target or an HTML attribute: ( ) < > " ' space.
        return quote(uri, safe="/:?#[]@!$&*+,;=%~")
    return ""


# Inline markdown a one-line value could start: emphasis, code, links and images, HTML and entities, strikethrough.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>~|&])")


def markdown_text(value: Any) -> str:
    """An event value as literal text in DingTalk markdown: one line (no forged headings or list items),
    markdown punctuation backslash-escaped, and ``@`` full-width so that it can look like no mention."""
    text = "" if value is None else " ".join(str(value).split())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text).replace("@", "\uff20")


def markdown_code(value: Any) -> str:
    """An event value as a markdown code span (backticks included) that it cannot break out of."""
    text = "" if value is None else " ".join(str(value).split())
    return "`" + text.replace("`", "'").replace("@", "\uff20") + "`"


def to_json(value: Any, indent: bool = False) -> str:
    """JSON with UTF-8 kept as is (Chinese stays readable)."""
    option = orjson.OPT_INDENT_2 if indent else 0
    return jsoncodec.dumps(value, option=option | orjson.OPT_NON_STR_KEYS, default=str).decode()


def clip(value: Any, length: int = 200, marker: str = "…") -> str:
    """Hard truncation to ``length`` characters with a visible marker."""
    text = "" if value is None else str(value)
    return text if len(text) <= length else text[: max(0, length - len(marker))] + marker


def compact(value: Any, items: int = 20, chars: int = 2000) -> Any:
    """``value`` with every list cut to its first ``items`` and every string to ``chars`` characters: an
    alert that carries it stays small whatever the event holds (a 1 MB event is not a 1 MB alert)."""
    if isinstance(value, str):
        return value if len(value) <= chars else clip(value, chars)
    # Most of what an alert holds is numbers and short strings: those are kept without a call.
    if isinstance(value, list | tuple):
        return [
            item
            if (kind := type(item)) in _PLAIN or (kind is str and len(item) <= chars)
            else compact(item, items, chars)
            for item in value[:items]
        ]
    if isinstance(value, dict) or isinstance(value, Mapping):  # noqa: SIM101 - the ABC test is slow for a dict
        return {
            key: item
            if (kind := type(item)) in _PLAIN or (kind is str and len(item) <= chars)
            else compact(item, items, chars)
            for key, item in value.items()
        }
    return value


# What compact keeps as it is.
_PLAIN = frozenset({int, float, bool, type(None)})


class BudgetExceeded(RenderError):
    """A render ran out of time or output."""


class _Budget:
    """What is left of one render's time and output, for the thread doing it."""

    _current = threading.local()

    def __init__(self, timeout: float, max_chars: int) -> None:
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.max_chars = max_chars
        self.chars = 0

    @classmethod
    def active(cls) -> _Budget | None:
        budget: _Budget | None = getattr(cls._current, "budget", None)
        return budget

    def __enter__(self) -> _Budget:
        self._current.budget = self
        return self

    def __exit__(self, *_: object) -> None:
        self._current.budget = None

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise BudgetExceeded(f"rendering took longer than {self.timeout:g}s; simplify the loops")

    def room(self) -> int:
        """Characters the output may still grow by."""
        return self.max_chars - self.chars

    def output(self, chars: int) -> None:
        self.chars += chars

    def check(self, value: Any) -> None:
        """Refuse an intermediate string or sequence longer than the whole output may be."""
        if isinstance(value, str | list | tuple) and len(value) > self.max_chars:
            raise self.too_long()

    def too_long(self) -> BudgetExceeded:
        return BudgetExceeded(f"the output grew past {self.max_chars} characters; clip what it lists")


def _loop_budget(iterable: Iterable[Any]) -> Iterable[Any]:
    budget = _Budget.active()
    return iterable if budget is None else _ticking(iterable, budget)


def _ticking(iterable: Iterable[Any], budget: _Budget) -> Iterator[Any]:
    for item in iterable:
        budget.tick()
        yield item


def _text_budget(text: Any) -> Any:
    budget = _Budget.active()
    if budget is not None:
        budget.check(text)
    return text


class _WithBudget(NodeTransformer):
    """Routes every ``{% for %}`` iterable and every ``~`` result through the budget filters."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "_loop_budget", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Filter(node, "_text_budget", [], [], None, None, lineno=node.lineno)


_DICT_ATTRIBUTES = frozenset(dir(dict))


class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+"})
    # Bits a ``**`` result may have (a 30,000-digit number): 2 ** (10**9) would take minutes to compute.
    MAX_POWER_BITS = 100_000

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        transformed: nodes.Template = _WithBudget().visit(tree)
        return transformed

    def getattr(self, obj: Any, attribute: str) -> Any:
        # ``imm.uris``: Jinja tries the attribute first and catches an AttributeError for every lookup in
        # a dict. A dict has an attribute only where the dict type has one, so elsewhere the item is the
        # same answer, without the exception.
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _Budget.active()
        if budget is not None:
            budget.tick()
        return super().call(context, obj, *args, **kwargs)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _Budget.active()
        if budget is not None:
            budget.tick()
            self._refuse_huge(budget, operator, left, right)
        result = super().call_binop(context, operator, left, right)
        if budget is not None:
            budget.check(result)
        return result

    def _refuse_huge(self, budget: _Budget, operator: str, left: Any, right: Any) -> None:
        """Refuse ``'x' * 10**9`` and ``2 ** (10**9)`` before computing them."""
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "**" and ints and abs(left) > 1 and right * abs(left).bit_length() > self.MAX_POWER_BITS:
            raise BudgetExceeded(f"{left} ** {right} is too large a number")
        if operator != "*":
            return
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and isinstance(times, int) and len(seq) * times > budget.max_chars:
                raise budget.too_long()


class TemplateSet:
    """Every template compiled twice (plain text and HTML-autoescaped) at load; nothing parses per event."""

    def __init__(
        self, templates_dir: Path, timezone: str = "UTC", *, timeout_seconds: float = 2.0, max_chars: int = 1_000_000
    ) -> None:
        if not templates_dir.is_dir():
            raise ConfigError("templates directory not found; set templates_dir in the config", path=str(templates_dir))
        self.dir = templates_dir
        self.zone = zoneinfo.ZoneInfo(timezone)
        self.timeout_seconds = timeout_seconds
        self.max_chars = max_chars
        self.text_env = self._env(autoescape=False)
        self.html_env = self._env(autoescape=True)
        # name → the template and its ancestors (``{% extends %}``), child first.
        self.text: dict[str, list[Template]] = {}
        self.html: dict[str, list[Template]] = {}
        self._ast: dict[str, nodes.Template] = {}  # name → parsed source, for the checks at load
        problems = []
        for name in self.names():
            try:
                self.text[name] = self._chain(self.text_env, name)
                self.html[name] = self._chain(self.html_env, name)
            except ConfigError as exc:
                problems.append(str(exc))
            except TemplateSyntaxError as exc:
                problems.append(
                    str(
                        ConfigError(
                            f"template syntax error: {exc.message}; fix the template",
                            path=str(Path(exc.filename or templates_dir / name)),
                            line=exc.lineno,
                        )
                    )
                )
            except TemplateError as exc:
                problems.append(str(ConfigError(f"template error: {exc}", path=str(templates_dir / name))))
        if problems:
            raise ConfigError("\n".join(problems))

    def names(self) -> list[str]:
        return sorted(
            p.relative_to(self.dir).as_posix()
            for p in self.dir.rglob("*")
            if p.suffix in TEMPLATE_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(self.dir).parts)
        )

    def _chain(self, env: ImmutableSandboxedEnvironment, name: str) -> list[Template]:
        chain: list[Template] = []
        current: str | None = name
        while current is not None:
            if len(chain) > 20 or current in (t.name for t in chain):
                raise ConfigError("templates extend each other in a loop; break the cycle", path=str(self.dir / name))
            template = env.get_template(current)
            # Jinja keeps a template's globals as a ChainMap over the environment's, and copies it key by
            # key into every render's context; the environment's are set by now, so a plain dict will do.
            template.globals = dict(template.globals)
            chain.append(template)
            source = env.loader.get_source(env, current)[0] if env.loader else ""
            ast = self._ast[current] = env.parse(source)
            extends = list(ast.find_all(nodes.Extends))
            if not extends:
                current = None
            elif isinstance(extends[0].template, nodes.Const) and isinstance(extends[0].template.value, str):
                current = extends[0].template.value
            else:
                raise ConfigError(
                    "{% extends %} must name its parent template as a literal string",
                    path=str(self.dir / current),
                    line=extends[0].lineno,
                )
        return chain

    def _env(self, *, autoescape: bool) -> ImmutableSandboxedEnvironment:
        env = _BudgetedSandbox(
            loader=FileSystemLoader(str(self.dir)),
            # {% include %} and {% import %} take the templates compiled (and checked) at load, however many:
            # no compile while routing, and an edited file waits for the next reload of the whole set.
            auto_reload=False,
            cache_size=-1,
            undefined=StrictUndefined,
            autoescape=autoescape,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
            finalize=lambda v: "" if v is None else v,
        )
        env.filters.update(
            localtime=self.localtime,
            duration=humanize_duration,
            oss_console=oss_console_url,
            md=markdown_text,
            md_code=markdown_code,
            json=to_json,
            clip=clip,
            compact=compact,
            _loop_budget=_loop_budget,
            _text_budget=_text_budget,
        )
        env.globals.update(severity_icon=SEVERITY_ICON)
        return env

    def localtime(self, value: Any, fmt: str = "%Y-%m-%d %H:%M:%S %Z") -> str:
        """A datetime or ISO string shown in the configured time zone; the raw value when it cannot be
        (``9999-12-31T23:59:59``, a common "never", overflows in any zone east of UTC)."""
        if value is None or value == "":
            return ""
        raw = str(value)
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value)
            except ValueError:
                return raw
        if not isinstance(value, datetime):
            return raw
        try:
            return str(value.astimezone(self.zone).strftime(fmt))
        except (OverflowError, ValueError, OSError):
            return raw

    def blocks(self, name: str) -> frozenset[str]:
        return frozenset(block for template in self.text[name] for block in template.blocks)

    def check_for(self, name: str, channel: ChannelConfigBase) -> str | None:
        """A problem with using template ``name`` for ``channel``, or None."""
        if name not in self.text:
            return f"template {name!r} not found under {self.dir}; check the path (relative to templates_dir)"
        missing = [b for b in channel.required_blocks if b not in self.blocks(name)]
        if missing:
            return (
                f"template {name!r} has no block {', '.join(missing)} which a "
                f"{getattr(channel, 'type', '')} channel needs; add {{% block {missing[0]} %}}…{{% endblock %}}"
            )
        return None

    def undefined_names(self, name: str, context: frozenset[str]) -> list[str]:
        """``file:line: …`` for each name template ``name`` (and what it extends) uses that a render with
        ``context`` does not define, and each ``imm.<key>`` the view does not have: under StrictUndefined
        either fails every render that reaches it. Found from the parsed source, so every branch counts."""
        known = context | frozenset(self.text_env.globals)
        problems = []
        for template in self.text[name]:
            assert template.name is not None
            ast, where = self._ast[template.name], self.dir / template.name
            free, unknown = _undefined_reads(ast, known)
            for line, missing in free:
                hint = did_you_mean(missing, known) or f"; a {name!r} render has: {', '.join(sorted(context))}"
                problems.append(f"{where}:{line}: template {name!r}: {missing!r} is not defined{hint}")
            if "imm" in context:
                for line, key in unknown:
                    hint = did_you_mean(key, VIEW_KEYS) or f"; imm has: {', '.join(sorted(VIEW_KEYS))}"
                    problems.append(f"{where}:{line}: template {name!r}: imm.{key} is not a key of the imm view{hint}")
        return list(dict.fromkeys(problems))

    def location(self, exc: BaseException) -> tuple[Path, int] | None:
        """The template file and line where a render error was raised (its innermost template frame)."""
        by_file = {t.filename: t for chain in self.text.values() for t in chain if t.filename}
        by_file |= {t.filename: t for chain in self.html.values() for t in chain if t.filename}
        found = None
        tb = exc.__traceback__
        while tb is not None:
            template = by_file.get(tb.tb_frame.f_code.co_filename)
            if template is not None and template.name is not None:
                found = (self.dir / template.name, template.get_corresponding_lineno(tb.tb_lineno))
            tb = tb.tb_next
        return found

    def render_parts(self, name: str, wanted: tuple[str, ...], context: dict[str, Any]) -> dict[str, str]:
        """Render the named blocks that the template defines, within one time and output budget."""
        parts: dict[str, str] = {}
        contexts: dict[bool, Context] = {}
        with _Budget(self.timeout_seconds, self.max_chars) as budget:
            for block in wanted:
                html = block == "html"
                if html not in contexts:
                    contexts[html] = self._context((self.html if html else self.text)[name], context)
                stack = contexts[html].blocks.get(block)
                if not stack:
                    continue
                try:
                    chunks = []
                    room = budget.room()  # time is checked where it can run long: loops and calls
                    for chunk in stack[0](contexts[html]):
                        room -= len(chunk)
                        if room < 0:
                            raise budget.too_long()
                        chunks.append(chunk)
                    budget.output(sum(map(len, chunks)))
                    parts[block] = "".join(chunks).strip()
                except RenderError as exc:
                    raise RenderError(f"template {name!r} block {block!r}: {exc}") from None
                except TemplateError as exc:
                    raise RenderError(f"template {name!r} block {block!r}: {exc}") from exc
                except RecursionError as exc:  # the cause keeps the template line for check's warnings
                    raise RenderError(
                        f"template {name!r} block {block!r}: recursion too deep (a macro or loop calling itself)"
                    ) from exc
                except MemoryError:
                    raise RenderError(f"template {name!r} block {block!r}: out of memory; clip what it lists") from None
                except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError) as exc:
                    raise RenderError(f"template {name!r} block {block!r}: {type(exc).__name__}: {exc}") from exc
        return parts

    @staticmethod
    def _context(chain: list[Template], variables: dict[str, Any]) -> Context:
        """A render context whose block stacks span the whole ``extends`` chain (for super/self)."""
        context = chain[0].new_context(variables)  # copies them (with the globals)
        for ancestor in chain[1:]:
            for block, render in ancestor.blocks.items():
                context.blocks.setdefault(block, []).append(render)
        return context


# Names Jinja provides inside loops, blocks, macros and call blocks.
_JINJA_LOCALS = frozenset({"loop", "self", "super", "caller", "varargs", "kwargs"})


def _guarded(node: nodes.Node, parent: nodes.Node | None) -> bool:
    """Whether ``node`` is read by a ``default`` filter or a ``defined`` test, which handle it undefined."""
    if isinstance(parent, nodes.Filter):
        return parent.node is node and parent.name in ("default", "d")
    return isinstance(parent, nodes.Test) and parent.node is node and parent.name in ("defined", "undefined")


def _undefined_reads(ast: nodes.Template, known: frozenset[str]) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(first line, name) of each name the template reads but neither defines anywhere in itself (set,
    for, with, macro, import) nor finds in ``known``; and (first line, key) of each ``imm.key`` /
    ``imm['key']`` the view lacks. A name or key the template also tests with ``is defined`` or reads
    through ``default`` is taken as handled. One walk of the tree (Jinja's
    ``meta.find_undeclared_variables`` compiles the template again)."""
    defined, guarded = set(known | _JINJA_LOCALS), set()
    names: dict[str, int] = {}
    keys: dict[str, int] = {}
    stack: list[tuple[nodes.Node, nodes.Node | None]] = [(ast, None)]
    while stack:
        node, parent = stack.pop()
        stack.extend((child, node) for child in node.iter_child_nodes())
        if isinstance(node, nodes.Name):
            if node.ctx != "load":
                defined.add(node.name)
            elif _guarded(node, parent):
                guarded.add(node.name)
            else:
                names.setdefault(node.name, node.lineno)
        elif isinstance(node, nodes.Macro):
            defined.add(node.name)
        elif isinstance(node, nodes.Import):
            defined.add(node.target)
        elif isinstance(node, nodes.FromImport):
            defined.update(n if isinstance(n, str) else n[1] for n in node.names)
        elif isinstance(node, nodes.Getattr | nodes.Getitem):
            target = node.node
            if not (isinstance(target, nodes.Name) and target.name == "imm" and target.ctx == "load"):
                continue
            key = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
            if isinstance(key, str) and key not in VIEW_KEYS:
                if _guarded(node, parent):
                    guarded.add(f"imm.{key}")
                else:
                    keys.setdefault(key, node.lineno)
    free = sorted((line, n) for n, line in names.items() if n not in defined and n not in guarded)
    unknown = sorted((line, k) for k, line in keys.items() if f"imm.{k}" not in guarded)
    return free, unknown


def template_set(settings: Settings) -> TemplateSet:
    """The templates of ``settings``, with its time zone and render budget."""
    return TemplateSet(
        settings.templates_dir,
        settings.timezone,
        timeout_seconds=settings.render_timeout_seconds,
        max_chars=settings.render_max_chars,
    )
