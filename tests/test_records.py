"""Row files as users and released datasets write them, read by one reader for training and
evaluation (moxkit.records): JSON Lines, a JSON list, one object, TOFU's JSON-Lines `.json`,
Parquet shards by pattern; errors in one line naming the file and the record."""

import json

import pytest

from moxkit.errors import MoxError
from moxkit.records import read_records

ROWS = [{"question": f"Q{i}", "answer": f"A{i}\u2028"} for i in range(3)]


def test_each_json_form_gives_the_same_records(tmp_path):
    forms = {
        "rows.jsonl": "\n".join(json.dumps(r) for r in ROWS) + "\n",
        "tofu.json": "\n".join(json.dumps(r) for r in ROWS) + "\n",  # TOFU's released files
        "list.json": json.dumps(ROWS, indent=2),
    }
    for name, text in forms.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert [rec for _, rec in read_records(tmp_path / name, "--forget")] == ROWS, name
    wheres = [w for w, _ in read_records(tmp_path / "tofu.json", "--forget")]
    assert wheres == ["line 1", "line 2", "line 3"]
    (tmp_path / "one.json").write_text(json.dumps(ROWS[0], indent=2))
    assert read_records(tmp_path / "one.json", "--forget") == [("item 1", ROWS[0])]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("broken.json", '[\n{"question": "Q"},\n', "broken.json: invalid JSON: Expecting value"),
        ("lines.json", '{"question": "Q"}\n{"question": \n', "lines.json: line 2: invalid JSON"),
        ("number.json", "3", "expected a JSON list of objects or one object per line"),
        ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_bad_json_files_fail_in_one_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(MoxError, match=message) as exc:
        read_records(tmp_path / name, "--forget")
    assert "\n" not in str(exc.value) and "--forget" in str(exc.value)


def test_a_pattern_reads_parquet_shards_in_name_order(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS[2:]), tmp_path / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), tmp_path / "train-00000-of-00002.parquet")
    got = read_records(tmp_path / "train-*.parquet", "--data")
    assert [rec for _, rec in got] == ROWS
    assert got[2][0] == "train-00001-of-00002.parquet: row 1"
    with pytest.raises(MoxError, match="no file matches"):
        read_records(tmp_path / "test-*.parquet", "--data")
