"""JSON as every file and ``--json`` output of longtail writes it: strict.

Python's ``json`` writes ``NaN`` and ``Infinity``, which are not JSON (browsers, ``jq`` and
most parsers reject the whole file). A number that is not finite is written as ``null``.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every float that is not finite replaced by None (recursively)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``obj`` (non-finite numbers as null)."""
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False)
