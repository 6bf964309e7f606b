"""Strict JSON for everything the project prints or writes.

JSON has no NaN or Infinity: Python's `json.dumps` writes them anyway (`NaN`), which strict parsers
(`jq`, `python -m json.tool`, JavaScript's `JSON.parse`) refuse. Every JSON document the CLI prints or
writes goes through `dumps`, which turns a non-finite number into `null` ("no value") and numpy
scalars into plain numbers, and refuses anything else that is not JSON rather than writing it.
"""

from __future__ import annotations

import json
import math
from pathlib import PurePath
from typing import Any


def json_safe(x: Any) -> Any:
    """`x` with every non-finite float replaced by None, numpy scalars and arrays made plain, paths
    made strings. Containers are copied; nothing else changes."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (str, int)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, PurePath):
        return str(x)
    item = getattr(x, "item", None)  # numpy scalars (and 0-d arrays)
    tolist = getattr(x, "tolist", None)  # numpy arrays
    if tolist is not None and getattr(x, "ndim", 0) > 0:
        return json_safe(tolist())
    if item is not None:
        return json_safe(item())
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def dumps(x: Any, **kwargs: Any) -> str:
    """json.dumps of json_safe(x) that can never emit NaN or Infinity."""
    return json.dumps(json_safe(x), allow_nan=False, **kwargs)
