"""The one JSON fallback: numpy scalars and arrays, paths and anything else become JSON values.

Used as `json.dumps(..., default=json_default)` by the CLI's JSON output (`console.emit_json`)
and by the on-disk cache (`text/cache.py`). A base-layer module: standard library only.
"""

from __future__ import annotations

from typing import Any


def json_default(value: Any) -> Any:
    """numpy scalars → Python numbers, arrays → lists, anything else → its `str` (paths, enums)."""
    if hasattr(value, "tolist"):  # numpy/torch arrays and scalars (a scalar's tolist() is its Python value)
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
