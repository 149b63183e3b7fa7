"""``imm-router test``: unit tests for rules, written in YAML by the people who write the rules.

```yaml
cases:
  - name: a failed media conversion pages on-call
    event_file: ../events/mns/MediaConvert-Failed.json   # or `event: {...}` inline
    expect:                                             # exactly these (rule, channel) pairs
      - rule: task-failed
        channel: oncall-dingtalk
        contains: ["MediaConvert"]                      # substrings of the rendered payload
        assert: ["msgtype == 'markdown'"]               # JMESPath on the payload, must be truthy
```
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TextIO

import jmespath
from jmespath.exceptions import JMESPathError
from pydantic import Field, model_validator

from router import jsoncodec
from router.channels.base import Frozen
from router.decode import decode, decode_object
from router.engine import Engine
from router.errors import ConfigError, DecodeError
from router.expr import truthy
from router.opsfile import LineDict, load_yaml, validate
from router.rules import JMESPATH_OPTIONS


class Expectation(Frozen):
    rule: str
    channel: str
    contains: tuple[str, ...] = ()
    assert_: tuple[str, ...] = Field(default=(), alias="assert")


class Case(Frozen):
    name: str
    event: dict[str, Any] | str | None = None
    event_file: str | None = None
    expect: tuple[Expectation, ...] = ()

    @model_validator(mode="after")
    def _one_event(self) -> Case:
        if (self.event is None) == (self.event_file is None):
            raise ValueError("give exactly one of `event` (inline) or `event_file` (a path)")
        return self


class TestFile(Frozen):
    cases: tuple[Case, ...] = Field(min_length=1)


def _run_case(engine: Engine, case: Case, base: Path) -> list[str]:
    """The failures of one case (empty when it passes)."""
    try:
        if case.event_file is not None:
            path = base / case.event_file
            try:
                raw = path.read_bytes()
            except OSError as exc:
                return [f"cannot read event_file {path}: {exc.strerror}"]
            event = decode(raw, limits=engine.limits, source=str(path))
        else:
            event = decode_object(case.event, limits=engine.limits, source="inline event")
    except DecodeError as exc:
        return [f"event does not decode: {exc}"]
    result = engine.route(event)
    failures = [str(f) for f in result.failures]
    got = {(n.rule, n.channel): n for n in result.notifications}
    want = [(e.rule, e.channel) for e in case.expect]
    if sorted(got) != sorted(want):
        diff = difflib.unified_diff(
            [f"{r} → {c}" for r, c in sorted(want)],
            [f"{r} → {c}" for r, c in sorted(got)],
            "expected",
            "routed",
            lineterm="",
        )
        failures.append("notifications differ:\n      " + "\n      ".join(diff))
    for expectation in case.expect:
        notification = got.get((expectation.rule, expectation.channel))
        if notification is None:
            continue
        text = jsoncodec.dumps(notification.payload).decode()
        plain = str(notification.payload)
        for needle in expectation.contains:
            if needle not in text and needle not in plain:
                failures.append(f"{expectation.rule} → {expectation.channel}: payload lacks {needle!r}")
        for expression in expectation.assert_:
            try:
                ok = truthy(jmespath.search(expression, notification.payload, options=JMESPATH_OPTIONS))
            except JMESPathError as exc:
                failures.append(f"{expectation.rule} → {expectation.channel}: bad assert {expression!r}: {exc}")
                continue
            if not ok:
                failures.append(f"{expectation.rule} → {expectation.channel}: assert failed: {expression}")
    return failures


def run_rule_tests(engine: Engine, files: list[Path], out: TextIO) -> int:
    passed = failed = 0
    for path in files:
        doc = load_yaml(path)
        suite = validate(TestFile, doc, path)
        cases_node = doc.get("cases") if isinstance(doc, LineDict) else None
        for i, case in enumerate(suite.cases):
            line = cases_node.item_lines[i] if cases_node is not None and hasattr(cases_node, "item_lines") else 0
            failures = _run_case(engine, case, path.parent)
            if failures:
                failed += 1
                out.write(f"FAIL {path}:{line} {case.name}\n")
                for failure in failures:
                    out.write(f"    {failure}\n")
            else:
                passed += 1
                out.write(f"ok   {path}:{line} {case.name}\n")
    if not passed and not failed:
        raise ConfigError("no test cases found", path=", ".join(map(str, files)))
    out.write(f"rule tests: {passed} passed, {failed} failed\n")
    return 1 if failed else 0
