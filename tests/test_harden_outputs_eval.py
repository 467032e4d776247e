"""Evaluation inputs are files from elsewhere (issue 20): a `--retain-model` report is read
within moxkit's JSON bounds and checked for what forget quality and PrivLeak take from it, in
one line before any model is loaded; the demo leaves out a PrivLeak its sets cannot support."""

from __future__ import annotations

import json
import os

import pytest
from test_harden_outputs import FAST, one_line, setup  # noqa: F401  (the shared fixture)

from moxkit.apps.demo import QUICK, run_demo
from moxkit.errors import MoxError


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the report was checked")

    monkeypatch.setattr("moxkit.eval.evaluate.load_model", refuse)


def _report(forget_items=None, **summary):
    sets = {} if forget_items is None else {"forget": {"items": forget_items}}
    return {"summary": {"forget_prob": 0.5, **summary}, "sets": sets}


BAD_REPORTS = {
    "string truth ratio": (_report([{"truth_ratio": "0.5"}]), "truth_ratio"),
    "bool truth ratio": (_report([{"truth_ratio": True}]), "truth_ratio"),
    "negative truth ratio": (_report([{"truth_ratio": -1.0}]), "truth_ratio"),
    "item not an object": (_report([0.5]), "item 1"),
    "forget not an object": ({"summary": {}, "sets": {"forget": [1]}}, "sets.forget"),
    "string AUC": (_report(mia_auc="0.5"), "mia_auc"),
    "AUC out of range": (_report(mia_auc=3.0), "mia_auc"),
    "summary text": (_report(forget_prob="low"), "forget_prob"),
    "summary a list": ({"summary": [1], "sets": {}}, "not a `moxkit eval` report"),
    "no sets": ({"summary": {}}, "not a `moxkit eval` report"),
}


@pytest.mark.parametrize("case", BAD_REPORTS)
def test_bad_retain_report_is_one_line_before_loading(cli, setup, no_model_loads, case, tmp_path):  # noqa: F811
    root, data, ref, mem, _ = setup
    report, message = BAD_REPORTS[case]
    path = tmp_path / "retain.json"
    path.write_text(json.dumps(report))
    result = cli("eval", ref, "--data", data, "--retain-model", path, *FAST)
    line = one_line(result)
    assert message in line and "--retain-model" in line
    # sweep reads the same report the same way
    result = cli("sweep", ref, mem, "--alphas", "1", "--data", data, "--retain-model", path,
                 *FAST)  # fmt: skip
    assert message in one_line(result)
    from moxkit.eval.data import retain_summary

    with pytest.raises(MoxError, match="retain"):  # and so does the library, on a dict
        retain_summary(report, "retain report")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 100_000 + "]" * 100_000, "nested"),
        ('{"summary": {}, "sets": {}, "summary": {}}', "twice"),
        ("[1, 2]", "not a JSON object"),
        ("\xff\xfe", "UTF-8"),
    ],
)
def test_malformed_retain_report_is_one_line(cli, setup, no_model_loads, tmp_path, text, message):  # noqa: F811
    root, data, ref, _, _ = setup
    path = tmp_path / "retain.json"
    path.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    result = cli("eval", ref, "--data", data, "--retain-model", path, *FAST)
    assert message in one_line(result)


def test_retain_report_that_is_a_fifo_does_not_hang(cli, setup, no_model_loads, tmp_path):  # noqa: F811
    root, data, ref, _, _ = setup
    fifo = tmp_path / "retain.json"
    os.mkfifo(fifo)
    result = cli("eval", ref, "--data", data, "--retain-model", fifo, *FAST)
    assert "not a regular file" in one_line(result)


def test_demo_leaves_out_privleak_and_says_why(tmp_path):
    """The demo unlearns QA rows, not the bios its membership test reads: MUSE's PrivLeak is
    not defined on such sets, and the table read -100 for every model."""
    result = run_demo(tmp_path / "demo", QUICK, progress=False, log=lambda m: None)
    assert all("privleak" not in row for row in result.rows)
    assert "PrivLeak→0" not in result.table and "PrivLeak left out" in result.table
    summary = json.loads(result.summary.read_text())
    assert "privleak" in summary["notes"] and all("privleak" not in r for r in summary["rows"])


def test_demo_never_deletes_a_folder_it_did_not_make(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(MoxError, match="holds no demo"):
        run_demo(mine, QUICK, force=True, progress=False, log=lambda m: None)
    assert (mine / "thesis.tex").read_text() == "years of work"
