"""JSON at the edges: the one parser of untrusted JSON text, and the one fallback for writing it.

`loads` is `json.loads` whose every failure on hostile text is a `json.JSONDecodeError` (so the
callers' one `except` gives one clean line): nesting deep enough to exhaust the recursion limit
(`[[[[…` 200,000 levels deep) and whole numbers with more digits than Python converts (over 4,300
by default) would otherwise escape as RecursionError and a bare ValueError. `json_default` is
used as `json.dumps(..., default=json_default)` by the CLI's JSON output (`console.emit_json`)
and by the on-disk cache (`text/cache.py`). A base-layer module: standard library only.

Not handled: NaN/Infinity literals are accepted as Python's json does (callers that need finite
numbers check the values they use).
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any


def loads(data: str | bytes) -> Any:
    """Parse JSON text; every malformed input raises `json.JSONDecodeError` (UTF-8 errors: UnicodeDecodeError).

    The error's position points at the nesting or the number that could not be read.
    """
    try:
        return json.loads(data)
    except RecursionError:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        raise json.JSONDecodeError("nested too deeply", text, _deepest(text)) from None
    except ValueError as exc:
        if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
            raise
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 4300
        found = re.search(rf"\d{{{max(limit, 1)},}}", text)
        raise json.JSONDecodeError(
            f"a whole number with more than {limit} digits", text, found.start() if found else 0
        ) from None


def _deepest(text: str, limit: int = 256) -> int:
    """Where the nesting of `text` first passes `limit` levels (0 if it never does); strings skipped."""
    depth, in_string, escaped = 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return i
        elif ch in "]}":
            depth -= 1
    return 0


def json_default(value: Any) -> Any:
    """numpy scalars → Python numbers, arrays → lists, anything else → its `str` (paths, enums)."""
    if hasattr(value, "tolist"):  # numpy/torch arrays and scalars (a scalar's tolist() is its Python value)
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
