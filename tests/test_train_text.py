"""moxkit.text and moxkit.records against hostile rows: huge rows, lone surrogates, deep
nesting, JSON Lines with Unicode line separators; and moxkit.hf's one-line errors."""

import json
import subprocess
import sys

import pytest

from moxkit.apps.tiny import build_word_tokenizer
from moxkit.errors import MoxError
from moxkit.hf import check_model_dir, load_model, resolve_device
from moxkit.text import CHARS_PER_TOKEN_CAP, IGNORE, encode, load_answers, load_rows


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(["Who wrote Dune ? Frank Herbert wrote it . word"])


def test_jsonl_with_unicode_line_separators_is_one_record_per_line(tmp_path):
    rows = [{"question": "a\u2028b\u0085c", "answer": "x\u2029y"}, {"text": "t\x1cu\x0bv"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows))
    loaded = load_rows(path, "--forget")
    assert [(r.prompt, r.completion) for r in loaded] == [
        ("a\u2028b\u0085c", "x\u2029y"),
        ("", "t\x1cu\x0bv"),
    ]
    assert loaded[1].where.endswith(":line 2")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"question": "Q \\ud800", "answer": "A"}\n', "lone surrogate"),
        ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "line 1: .*nested too deeply"),
        ("[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
        ('{"text": ' + "9" * 5000 + "}\n", "invalid JSON"),
        ('{"question": "Q", "answer": "A"}\n{"question": "Q"\n', "line 2: invalid JSON"),
    ],
)
def test_bad_rows_one_line_error(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8", errors="surrogatepass")
    with pytest.raises(MoxError, match=message) as info:
        load_rows(path, "--forget")
    assert "\n" not in str(info.value)


def test_deeply_nested_json_file_and_surrogate_answer(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(MoxError, match="nested too deeply"):
        load_rows(path, "--forget")
    answers = tmp_path / "t.jsonl"
    answers.write_text('{"answer": "no \\udfff"}\n')
    with pytest.raises(MoxError, match="lone surrogate"):
        load_answers(answers, "--target-file")


class CountingTokenizer:
    """Wraps a tokenizer and records the length of every text it is asked to tokenise."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, text, **kw):
        self.seen.append(len(text))
        return self.inner(text, **kw)


def test_huge_row_is_cut_before_tokenising(tok):
    """A 10 MB answer must not reach the tokenizer whole (a 100 MB row took 11 GiB), and the
    first max_length tokens are the same as tokenising it whole."""
    max_length = 16
    small = load_rows([{"question": "Who wrote Dune ?", "answer": "word " * 40}], "--forget")
    huge = load_rows([{"question": "Who wrote Dune ?", "answer": "word " * 2_000_000}], "--forget")
    counting = CountingTokenizer(tok)
    [cut] = encode(huge, counting, max_length, False)
    assert max(counting.seen) <= 2 * (CHARS_PER_TOKEN_CAP * max_length + 1024)
    [whole] = encode(small, tok, max_length, False)
    assert cut == whole and len(cut.input_ids) == max_length
    assert cut.labels[:5] == [IGNORE] * 5 and IGNORE not in cut.labels[5:]


def test_device_and_model_dir_errors(tmp_path):
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(MoxError, match="expected auto, cpu"):
        resolve_device("tpu-ish:x")
    with pytest.raises(MoxError, match="no such file or directory"):
        check_model_dir(tmp_path / "missing", "MODEL")
    (tmp_path / "m").mkdir()
    with pytest.raises(MoxError, match="no config.json"):
        check_model_dir(tmp_path / "m", "MODEL")
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(MoxError, match="no tokenizer files"):
        load_model(tmp_path / "m", "MODEL")
    (tmp_path / "m" / "tokenizer.json").write_text("not json")
    # refused before transformers reads it: the checked view names the file
    with pytest.raises(
        MoxError, match=r"MODEL .*m/tokenizer.json: model file is not valid JSON"
    ) as info:
        load_model(tmp_path / "m", "MODEL")
    assert "\n" not in str(info.value)


def test_text_imports_no_torch():
    """Evaluation reads rows through moxkit.text; it must not drag in torch or the trainer."""
    heavy = "{'torch', 'transformers', 'accelerate'}"
    code = f"import sys, moxkit.text; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
