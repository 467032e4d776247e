"""Reading row files (JSONL, JSON, Parquet) with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MoxError


def read_records(path: Path, name: str) -> list[tuple[str, object]]:
    """(where, record) pairs of a JSONL, JSON or Parquet file, by its suffix; `where`
    ("line 3", "item 3", "row 3") lets callers' own errors point at the record. A `.json` file
    is a list of records, one object, or JSON Lines (TOFU's released `.json` files hold one
    object per line). A `*` in the file name (Hugging Face's parquet shards) reads the matching
    files in name order, one after the other. `name` says which input this is (an option
    name, a split) in the errors raised here."""
    if "*" in path.name:
        shards = sorted(path.parent.glob(path.name))
        if not shards:
            raise MoxError(f"{name} {path}: no file matches")
        return [
            (f"{shard.name}: {where}", rec)
            for shard in shards
            for where, rec in read_records(shard, name)
        ]
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
        raise MoxError(f"{name} {path}: cannot read: {_one_line(exc)}") from None
    except Exception as exc:  # pyarrow raises its own types for corrupt files
        raise MoxError(f"{name} {path}: not a readable Parquet file: {_one_line(exc)}") from None
    records = _parse(text, f"{name} {path}", several=_SEVERAL) if suffix == ".json" else _SEVERAL
    if records is not _SEVERAL:
        if isinstance(records, dict):
            return [("item 1", records)]
        if not isinstance(records, list):
            raise MoxError(f"{name} {path}: expected a JSON list of objects or one object per line")
        return [(f"item {i + 1}", rec) for i, rec in enumerate(records)]
    # JSON Lines: records end at "\n" only. str.splitlines would also split at U+2028, U+0085
    # and friends, which JSON allows raw inside strings.
    out = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            out.append((f"line {lineno}", _parse(line, f"{name} {path}: line {lineno}")))
    return out


_SEVERAL = object()  # _parse's answer for text holding several documents: JSON Lines


def _parse(text: str, where: str, several: object = None) -> object:
    """One JSON document; `several` (if given) is returned where one complete document is
    followed by more (JSON Lines), instead of an error."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if several is not None and exc.msg == "Extra data":
            return several
        raise MoxError(f"{where}: invalid JSON: {exc.msg} at character {exc.pos}") from None
    except RecursionError:
        raise MoxError(f"{where}: invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer past Python's digit limit
        raise MoxError(f"{where}: invalid JSON: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
