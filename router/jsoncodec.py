"""JSON in and out at orjson's speed, with integers of any size kept exact.

orjson reads an integer beyond 64 bits as a float (two ids 2^64+1 and 2^64+2 would become one) and
refuses to write one. Text holding a run of 19 or more digits is read again with the standard library,
which keeps such integers exact; a value orjson cannot write is written by the standard library.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import date, datetime, time
from typing import Any

import orjson

# A regex for 19 digits tries a match at every digit (70 µs on a 4 KB record full of base64); mapping
# every digit to "0" and searching for nineteen of them is two passes in C.
_ZEROED = bytes.maketrans(b"123456789", b"000000000")
_NINETEEN = b"0" * 19
_LONG_DIGITS_TEXT = re.compile(r"[0-9]{19}")


def loads(raw: bytes | str) -> Any:
    """Parse JSON (orjson's rules: no NaN, valid UTF-8); raises orjson.JSONDecodeError."""
    value = orjson.loads(raw)
    if isinstance(raw, bytes):
        long_digits = _NINETEEN in raw.translate(_ZEROED)
    else:
        long_digits = _LONG_DIGITS_TEXT.search(raw) is not None
    if not long_digits:
        return value
    return json.loads(raw)  # orjson has checked it is valid: only the integers differ


def dumps(value: Any, *, option: int = 0, default: Callable[[Any], Any] | None = None) -> bytes:
    try:
        return orjson.dumps(value, option=option, default=default)
    except orjson.JSONEncodeError as exc:
        if "64-bit" not in str(exc):
            raise
    indent = 2 if option & orjson.OPT_INDENT_2 else None

    def fallback(obj: Any) -> Any:
        if isinstance(obj, datetime | date | time):
            return obj.isoformat()  # as orjson writes them
        if default is None:
            raise TypeError(f"{type(obj).__name__} is not JSON serializable")
        return default(obj)

    return json.dumps(
        value,
        ensure_ascii=False,
        separators=(",", ": ") if indent else (",", ":"),
        indent=indent,
        sort_keys=bool(option & orjson.OPT_SORT_KEYS),
        default=fallback,
    ).encode()
