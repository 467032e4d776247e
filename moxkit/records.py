"""Reading row files (JSONL, JSON, Parquet) with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MoxError


def read_records(path: Path, name: str) -> list[tuple[str, object]]:
    """(where, record) pairs of a JSONL, JSON (a list) or Parquet file, by its suffix; `where`
    ("line 3", "item 3", "row 3") lets callers' own errors point at the record. `name` says
    which input this is (an option name, a split) in the errors raised here."""
    if not path.is_file():
        raise MoxError(f"{name} {path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path).to_pylist()
            return [(f"row {i + 1}", rec) for i, rec in enumerate(table)]
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MoxError(f"{name} {path}: cannot read: {exc}") from None
    except Exception as exc:  # pyarrow raises its own types for corrupt files
        raise MoxError(f"{name} {path}: not a readable Parquet file: {exc}") from None
    if suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MoxError(f"{name} {path}: invalid JSON: {exc}") from None
        if not isinstance(records, list):
            raise MoxError(f"{name} {path}: expected a JSON list of objects")
        return [(f"item {i + 1}", rec) for i, rec in enumerate(records)]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise MoxError(f"{name} {path}: line {lineno}: invalid JSON: {exc.msg}") from None
    return out
