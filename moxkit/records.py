"""Reading row files (JSONL, JSON, Parquet) with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError, MoxError


def read_records(path: Path, name: str) -> list[tuple[str, object]]:
    """(where, record) pairs of a JSONL, JSON or Parquet file, by its suffix; `where`
    ("line 3", "item 3", "row 3") lets callers' own errors point at the record. A `.json` file
    is a list of records, one object, or JSON Lines (TOFU's released `.json` files hold one
    object per line). A `*` in the file name (Hugging Face's parquet shards) reads the matching
    files in name order, one after the other. `name` says which input this is (an option
    parameter, a split) in the errors raised here."""
    if "*" in path.name:
        shards = sorted(path.parent.glob(path.name))
        if not shards:
            raise InputError(f"{name} {path}: no file matches", params=(name,))
        return [
            (f"{shard.name}: {where}", rec)
            for shard in shards
            for where, rec in read_records(shard, name)
        ]
    if not path.is_file():
        raise InputError(f"{name} {path}: no such file", params=(name,))
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return [(f"row {i + 1}", rec) for i, rec in enumerate(_parquet_rows(path, name))]
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{name} {path}: cannot read: {_one_line(exc)}", params=(name,)) from None
    except MoxError:
        raise
    except Exception as exc:  # pyarrow raises its own types for corrupt files
        raise InputError(f"{name} {path}: not a readable Parquet file: {_one_line(exc)}",
                         params=(name,)) from None  # fmt: skip
    records = _parse(text, f"{name} {path}", name, _SEVERAL) if suffix == ".json" else _SEVERAL
    if records is not _SEVERAL:
        if isinstance(records, dict):
            return [("item 1", records)]
        if not isinstance(records, list):
            raise InputError(f"{name} {path}: expected a JSON list of objects or one object "
                             "per line", params=(name,))  # fmt: skip
        return [(f"item {i + 1}", rec) for i, rec in enumerate(records)]
    # JSON Lines: records end at "\n" only. str.splitlines would also split at U+2028, U+0085
    # and friends, which JSON allows raw inside strings.
    out = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            out.append((f"line {lineno}", _parse(line, f"{name} {path}: line {lineno}", name)))
    return out


# Parquet packs rows far below a byte each (dictionary and run-length encoding: a 12 KB file
# holds 1.7 M rows, which cost 9 GiB as Python objects), so what a file may unfold into is
# bounded by its size on disk, not by what its metadata claims, and by fixed limits.
PARQUET_ROWS_PER_BYTE = 1  # a row of text takes at least a byte of a real file
PARQUET_MAX_ROWS = 10_000_000
PARQUET_TEXT_PER_BYTE = 100  # decoded text per byte of file (real text compresses ~3-10x)
PARQUET_MIN_TEXT = 64 << 20  # ... but a small file may always unfold to this much
PARQUET_MAX_TEXT = 2 << 30
PARQUET_BATCH_ROWS = 1024


def _parquet_rows(path: Path, name: str) -> list[object]:
    """The rows of a Parquet file, refused in one line when they would unfold into more rows
    or text than the file's size allows (see PARQUET_*), checked batch by batch before each
    batch becomes Python objects."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    size = path.stat().st_size
    with pq.ParquetFile(path) as f:  # text columns read as dictionaries: nothing unfolds yet
        text_columns = [c.name for c in f.schema_arrow if pa.types.is_string(c.type)]
    with pq.ParquetFile(path, read_dictionary=text_columns) as f:
        claimed = f.metadata.num_rows
        max_rows = min(PARQUET_MAX_ROWS, size * PARQUET_ROWS_PER_BYTE)
        if claimed > max_rows:
            raise InputError(f"{name} {path}: {claimed:,} rows in {size:,} bytes; moxkit reads at "
                             f"most {max_rows:,} rows from a Parquet file this size",
                             params=(name,))  # fmt: skip
        max_text = min(PARQUET_MAX_TEXT, max(PARQUET_MIN_TEXT, size * PARQUET_TEXT_PER_BYTE))
        rows: list[object] = []
        text = 0
        for batch in f.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            text += sum(_unfolded_bytes(column) for column in batch.columns)
            if text > max_text or len(rows) + batch.num_rows > max_rows:
                raise InputError(f"{name} {path}: unfolds into more than {max_text:,} bytes or "
                                 f"{max_rows:,} rows ({size:,} bytes on disk)",
                                 params=(name,))  # fmt: skip
            rows += batch.to_pylist()
    return rows


def _unfolded_bytes(column) -> int:
    """Bytes a column's values take once every dictionary entry is written out per row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(column.type):
        values = column.dictionary
        if pa.types.is_string(values.type) or pa.types.is_binary(values.type):
            lengths = pc.binary_length(values)
        else:
            lengths = pa.array([values.nbytes // max(1, len(values))] * len(values))
        return int(pc.sum(pc.take(lengths, column.indices)).as_py() or 0) + 8 * len(column)
    return column.nbytes


_SEVERAL = object()  # _parse's answer for text holding several documents: JSON Lines


def _parse(text: str, where: str, name: str, several: object = None) -> object:
    """One JSON document; `several` (if given) is returned where one complete document is
    followed by more (JSON Lines), instead of an error. `where` starts with `name`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if several is not None and exc.msg == "Extra data":
            return several
        raise InputError(f"{where}: invalid JSON: {exc.msg} at character {exc.pos}",
                         params=(name,)) from None  # fmt: skip
    except RecursionError:
        raise InputError(f"{where}: invalid JSON: nested too deeply", params=(name,)) from None
    except ValueError as exc:  # e.g. an integer past Python's digit limit
        raise InputError(f"{where}: invalid JSON: {_one_line(exc)}", params=(name,)) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
