"""`moxkit sweep`: each α's forget model is (1+α)·REF − α·MEM (checked against fp64 arithmetic
through its evaluation), the in-memory and on-disk paths agree, and the rule picks as stated."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from moxkit.apps.sweep import parse_alphas, pick_alpha, sweep
from moxkit.apps.tiny import build_tiny_llama, save_tiny_model
from moxkit.apps.tofu_mini import write
from moxkit.cli.main import main
from moxkit.errors import InputError
from moxkit.eval.evaluate import EvalConfig, evaluate_model, load_model

CFG = EvalConfig(max_new_tokens=4, verbmem_max_new_tokens=4)
FAST = ["--max-new-tokens", "4", "--verbmem-max-new-tokens", "4"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    bench = write(root / "tm", n_authors=10)
    tok = AutoTokenizer.from_pretrained(bench / "tokenizer")
    data = root / "small"  # a few rows of each set keep the many evaluations cheap
    data.mkdir()
    for name in ("forget", "retain", "general", "forget_text", "holdout_text"):
        lines = (bench / "forget10" / f"{name}.jsonl").read_text().splitlines()
        (data / f"{name}.jsonl").write_text("\n".join(lines[:4]) + "\n")
    ref = build_tiny_llama(len(tok), hidden_size=32, seed=1)
    mem = build_tiny_llama(len(tok), hidden_size=32, seed=1)
    with torch.no_grad():  # MEM = REF plus a small, seeded displacement
        g = torch.Generator().manual_seed(5)
        for p in mem.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return (
        root,
        data,
        save_tiny_model(ref, tok, root / "ref"),
        save_tiny_model(mem, tok, root / "mem"),
    )


def test_sweep_matches_fp64_extrapolation_on_both_paths(models):
    root, data, ref, mem = models
    alphas = [2.0]
    in_mem = sweep(ref, mem, alphas, data, cfg=CFG, on_disk=False, progress=False)
    on_disk = sweep(ref, mem, alphas, data, cfg=CFG, on_disk=True, progress=False)
    assert [r["alpha"] for r in in_mem.rows] == [0.0, 2.0]
    r_model, tok = load_model(ref, "cpu")
    m_model, _ = load_model(mem, "cpu")
    for row_mem, row_disk, alpha in zip(in_mem.rows, on_disk.rows, [0.0, *alphas], strict=True):
        oracle = load_model(ref, "cpu")[0]
        ref_sd, mem_sd = r_model.state_dict(), m_model.state_dict()
        oracle.load_state_dict(
            {
                k: ((1 + alpha) * ref_sd[k].double() - alpha * mem_sd[k].double()).float()
                for k in ref_sd
            }
        )
        want = evaluate_model(oracle, tok, data, cfg=CFG)["summary"]
        for key in ("forget_prob", "retain_prob", "forget_truth_ratio", "model_utility"):
            assert row_mem[key] == pytest.approx(want[key], rel=1e-5), (alpha, key)
            assert row_disk[key] == pytest.approx(want[key], rel=1e-5), (alpha, key)


def test_pick_alpha_rule():
    rows = [
        {"alpha": 0.0, "forget_prob": 0.9, "model_utility": 0.9},
        {"alpha": 1.0, "forget_prob": 0.5, "model_utility": 0.8},
        {"alpha": 2.0, "forget_prob": 0.2, "model_utility": 0.6},
        {"alpha": 4.0, "forget_prob": 0.1, "model_utility": 0.7},
        {"alpha": 8.0, "forget_prob": 0.05, "model_utility": 0.2},
    ]
    assert pick_alpha(rows, {"forget_prob": 0.3}, "forget_prob") == 4.0
    assert pick_alpha(rows, {"forget_prob": 0.01}, "forget_prob") is None
    assert pick_alpha(rows, {}, "forget_prob") is None
    assert parse_alphas("4, 0.5,1,1") == [0.5, 1.0, 4.0]
    # the study's grid: 1 to 8 in steps of 0.5, exact decimals, ranges and lists combined
    assert parse_alphas("1:8:0.5") == [1 + 0.5 * i for i in range(15)]
    assert parse_alphas("0.5,2:3:0.1") == [
        0.5,
        2.0,
        2.1,
        2.2,
        2.3,
        2.4,
        2.5,
        2.6,
        2.7,
        2.8,
        2.9,
        3.0,
    ]
    for bad in ("", "1,x", "0,1", "-2", "1:8", "3:1:0.5", "1:8:0", "1:1e6:1", "nan", "1e9"):
        with pytest.raises(InputError, match="^alphas"):
            parse_alphas(bad)


def test_sweep_cli_with_retain_model_writes_table_plot_json(models, capsys):
    root, data, ref, mem = models
    out = root / "out"
    main(
        [
            "sweep",
            str(ref),
            str(mem),
            "--alphas",
            "1,3",
            "--data",
            str(data),
            "--retain-model",
            str(ref),
            "-o",
            str(out),
            "-q",
            *FAST,
            "--mia",
            "min_k_pp",
            "--min-k",
            "0.2",
            "--chat-template",
        ]
    )
    printed = capsys.readouterr().out
    report = json.loads((out / "sweep.json").read_text())
    assert [r["alpha"] for r in report["rows"]] == [0.0, 1.0, 3.0]
    assert report["rows"][0]["forget_quality"] == 1.0  # REF is its own retain model here
    assert (out / "sweep.png").stat().st_size > 10_000 and "picked" in printed
    # the evaluation options sweep shares with eval reach the evaluation
    assert report["config"]["mia"] == "min_k_pp" and report["config"]["min_k"] == 0.2
    assert report["config"]["chat_template"] and "Min-K%++" in report["notes"]["mia_auc"]
    # beside the numbers: a starred column and its note under the table
    assert "MU↑*" in printed and "* MU↑: over retain, general (6 numbers)" in printed
    with pytest.raises(SystemExit) as exc:
        main(["sweep", str(ref), str(root / "missing"), "--data", str(data), "-q"])
    assert exc.value.code == 1 and "MEM" in capsys.readouterr().err


def test_sweep_checks_everything_before_any_work(models, tmp_path, monkeypatch, capsys):
    """A sweep that would fail later (MEM not paired with REF, an unwritable OUT, a missing
    retain report) fails before a single model is loaded or evaluated."""
    root, data, ref, mem = models
    import moxkit.eval.evaluate as ev

    def no_work(*args, **kwargs):
        raise AssertionError("a model was loaded or evaluated before the checks ended")

    monkeypatch.setattr(ev, "evaluate_model", no_work)
    monkeypatch.setattr(ev, "load_model", no_work)
    tok = AutoTokenizer.from_pretrained(ref)
    other = save_tiny_model(
        build_tiny_llama(len(tok), hidden_size=16, seed=2), tok, tmp_path / "other"
    )
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    no_texts = tmp_path / "no_texts"  # no text sets: nothing measures VerbMem
    no_texts.mkdir()
    for name in ("forget", "retain"):
        (no_texts / f"{name}.jsonl").write_text((data / f"{name}.jsonl").read_text())
    capsys.readouterr()
    for extra, needle in [
        ([str(ref), str(other), "--on-disk"], "shape"),
        ([str(ref), str(other), "--in-memory"], "shape"),
        ([str(ref), str(mem), "--on-disk", "-o", str(blocker / "out")], str(blocker)),
        (
            [str(ref), str(mem), "--on-disk", "--retain-model", str(tmp_path / "r.json")],
            "r.json: no such file or directory",
        ),
        ([str(ref), str(mem), "--metric", "verbmem_forget", "--max-items", "0"], "--max-items 0"),
        (
            [str(ref), str(mem), "--metric", "verbmem_forget", "--retain-model", str(ref)],
            "--metric verbmem_forget: ",
        ),
    ]:
        extra += ["--data", str(no_texts if "verbmem_forget" in extra else data)]
        with pytest.raises(SystemExit) as exc:
            main(["sweep", *extra, "--alphas", "1:3:1", "-q"])
        err = capsys.readouterr().err
        assert exc.value.code == 1 and needle in err, err
        assert len(err.strip().splitlines()) == 1


def test_sweep_matched_forgetting_picks_the_matched_alpha(models, tmp_path, capsys):
    """--match-rows/--match-target: the α found by bisection is evaluated and picked; its
    forget model's level equals the reported one (recomputed here from the fp32 formula)."""
    from moxkit.matching import answer_logprob
    from moxkit.train import extrapolate_model

    root, data, ref, mem = models
    rows = [json.loads(x) for x in (data / "forget.jsonl").read_text().splitlines()]
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"prompt": r["question"], "completion": r["answer"]}) + "\n"
                           for r in rows[:3]))  # fmt: skip
    r_model, tok = load_model(ref, "cpu")
    m_model, _ = load_model(mem, "cpu")
    base = answer_logprob(r_model, tok, val)
    target = base - 1.0
    main(["sweep", str(ref), str(mem), "--data", str(data), "--alphas", "1", "--match-rows",
          str(val), "--match-target", repr(target), "-o", str(tmp_path / "out"), "-q",
          *FAST])  # fmt: skip
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "sweep.json").read_text())
    m = report["match"]
    assert report["picked_alpha"] == m["strength"] and m["target"] == target
    assert m["strength"] in [r["alpha"] for r in report["rows"]]
    forget = extrapolate_model(r_model, m_model, m["strength"])
    assert answer_logprob(forget, tok, val) == m["level"] <= target
    assert "matched: α = " in out
    with pytest.raises(SystemExit):  # both or neither
        main(["sweep", str(ref), str(mem), "--data", str(data), "--match-rows", str(val)])
    assert "give both" in capsys.readouterr().err
