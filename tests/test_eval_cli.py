"""`moxkit eval` end to end on a tiny model: the report's structure and its self-consistency
(a model compared with itself is indistinguishable), and one-line errors for bad inputs."""

import json

import pytest
from transformers import AutoTokenizer

from moxkit.apps.tiny import build_tiny_llama, save_tiny_model
from moxkit.apps.tofu_mini import write
from moxkit.cli.main import main
from moxkit.eval import metrics as M


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    data = write(root / "tm", n_authors=20)
    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    model = save_tiny_model(build_tiny_llama(len(tok), seed=1), tok, root / "model")
    other = save_tiny_model(build_tiny_llama(len(tok), seed=2), tok, root / "other")
    return root, data / "forget10", model, other


def _eval(model, data, retain, out):
    """`moxkit eval` with short generations (tiny random models never stop on their own)."""
    fast = ["--max-items", "8", "--max-new-tokens", "4", "--verbmem-max-new-tokens", "4"]
    main(["eval", str(model), "--data", str(data), "--retain-model", str(retain), *fast, "-q",
          "-o", str(out)])  # fmt: skip


def test_eval_report_against_itself_and_another(setup, capsys):
    root, data, model, other = setup
    self_json, other_json = root / "self.json", root / "other.json"
    _eval(model, data, retain=model, out=self_json)
    out = capsys.readouterr().out
    assert "forget_quality" in out and "model_utility" in out
    rep = json.loads(self_json.read_text())
    s = rep["summary"]
    assert s["forget_quality"] == 1.0 and s["ks_statistic"] == 0.0
    # PrivLeak is relative to the retain model's AUC: undefined (left out) when that is 0
    assert s["privleak"] == 0.0 if s["mia_auc"] > 0 else "privleak" not in s
    forget = rep["sets"]["forget"]
    n_forget = len((data / "forget.jsonl").read_text().splitlines())
    assert forget["summary"]["items"] == n_forget and len(forget["items"]) == n_forget
    assert rep["sets"]["retain"]["summary"]["items"] == 8  # the first 8 rows (TOFU's ds_size)
    retain_rows = [json.loads(x) for x in (data / "retain.jsonl").read_text().splitlines()[:8]]
    assert [i["question"] for i in rep["sets"]["retain"]["items"]] == [
        r["question"] for r in retain_rows
    ]
    # the summary is the mean of the per-item numbers and the utility their harmonic mean
    assert s["forget_prob"] == pytest.approx(sum(i["prob"] for i in forget["items"]) / n_forget)
    parts = [
        s[f"{n}_{k}"]
        for n in ("retain", "general")
        for k in ("prob", "rouge_recall", "truth_ratio")
    ]
    assert s["model_utility"] == pytest.approx(M.harmonic_mean(parts))
    # moxkit's own layout departs from TOFU's MU and MUSE's KnowMem/VerbMem: said beside them
    assert "TOFU's: retain, real_authors, world_facts (9)" in rep["notes"]["model_utility"]
    assert "zero-shot" in rep["notes"]["knowmem_forget"] and "verbmem_forget" in rep["notes"]
    assert "(moxkit layout)" in out and "forget.jsonl" in out

    # another model, compared with the saved report of the first: the p-value is what scipy
    # gives for the two samples of truth ratios
    _eval(other, data, retain=self_json, out=other_json)
    rep2 = json.loads(other_json.read_text())
    from scipy.stats import ks_2samp

    want = ks_2samp(
        [i["truth_ratio"] for i in rep2["sets"]["forget"]["items"]],
        [i["truth_ratio"] for i in forget["items"]],
    ).pvalue
    assert rep2["summary"]["forget_quality"] == pytest.approx(want)
    if s["mia_auc"] > 0:
        assert rep2["summary"]["privleak"] == pytest.approx(
            M.priv_leak(rep2["summary"]["mia_auc"], s["mia_auc"])
        )


def test_eval_bad_inputs_one_line(setup, tmp_path, capsys):
    root, data, model, _ = setup
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "forget.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    for args, needle in [
        (["eval", str(model), "--data", str(bad)], "forget.jsonl: row 1: missing field(s)"),
        (["eval", str(model), "--data", str(tmp_path / "none")], "not a directory"),
        (["eval", str(tmp_path), "--data", str(data)], "no config.json"),
        (
            ["eval", str(model), "--data", str(data), "--split", "forget10"],
            "only TOFU's released layout has several forget sets",
        ),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(args + ["-q"])
        err = capsys.readouterr().err
        assert exc.value.code == 1 and needle in err and len(err.strip().splitlines()) == 1
