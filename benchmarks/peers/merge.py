"""Merge result rows into ``benchmarks/results/quality.json`` without dropping other methods.

Several runners write that file's ``rows`` (the codec's quality benchmark, the
rate-distortion harness, the peers here). Each owns the methods it measures: merging
replaces the existing rows of exactly those methods and keeps every other row and the
file's other keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def merge_rows(path: Path, rows: list[dict], meta_key: str | None = None, meta=None) -> dict:
    """Put ``rows`` into the JSON file at ``path``, replacing rows of the same methods.

    Args:
        path: the results file (created if missing).
        rows: dicts with at least ``method``.
        meta_key, meta: optionally also store ``meta`` under this top-level key.

    Returns:
        The document written.

    Raises:
        ValueError: a row without ``method``.
        TypeError: the file is not a JSON object with a ``rows`` list.
    """
    if any("method" not in r for r in rows):
        raise ValueError("every row needs a 'method'")
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    if not isinstance(doc, dict) or not isinstance(doc.get("rows", []), list):
        raise TypeError(f"{path} is not a results document with a 'rows' list")
    mine = {r["method"] for r in rows}
    doc["rows"] = [r for r in doc.get("rows", []) if r.get("method") not in mine] + list(rows)
    if meta_key is not None:
        doc[meta_key] = meta
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return doc
