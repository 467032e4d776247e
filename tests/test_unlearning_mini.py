"""moxkit.apps.unlearning_mini --quick (the CI form of studies/unlearning_mini.py): every
sweep has the points the protocol lists, every choice is the rule's on the validation numbers,
and the intervals are scipy's t-intervals over the pipeline means."""

import json
import statistics

import numpy as np
import pytest
from scipy import stats

from moxkit.apps import unlearning_mini
from moxkit.apps.study import KEEP


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    module = unlearning_mini
    root = tmp_path_factory.mktemp("um")
    record = module.run_budget(module.QUICK, "unlearning_mini_quick", root / "out", root / "work")
    return module, record, root / "out"


def test_outputs_written(study):
    module, record, out = study
    assert json.loads((out / "unlearning_mini_quick.json").read_text())["wall_seconds"] > 0
    assert "the rule's choices" in (out / "unlearning_mini_quick_tables.md").read_text()
    for kind in ("alpha", "frontier", "trajectories"):
        assert (out / f"unlearning_mini_quick_{kind}.png").stat().st_size > 10_000


def test_sweeps_and_choices_follow_the_protocol(study):
    module, record, _ = study
    budget = module.QUICK
    results = record["results"]
    assert [r["pipeline"] for r in results] == list(budget.pipelines)
    for res in results:
        ref = res["reference"]["val"]
        ref_u = 2 / (1 / ref["retain_prob"] + 1 / ref["general_prob"])
        assert [run["seed"] for run in res["runs"]] == list(budget.seeds)
        for run in res["runs"]:
            pts = run["points"]
            by_method = {}
            for i, p in enumerate(pts):
                by_method.setdefault(p["method"], []).append(i)
            assert [pts[i]["alpha"] for i in by_method["mox"]] == list(budget.alphas)
            assert len(by_method["ga"]) == len(budget.lrs) * budget.unlearn_epochs
            assert len(by_method["mox-momentum"]) == len(budget.etas) * len(budget.coarse_alphas)
            for method, idx in by_method.items():
                u = [
                    2 / (1 / pts[i]["val"]["retain_prob"] + 1 / pts[i]["val"]["general_prob"])
                    for i in idx
                ]
                ok = [k for k in range(len(idx)) if u[k] >= KEEP * ref_u]
                want = (
                    max(ok, key=lambda k: (pts[idx[k]]["val"]["forget_quality"], u[k]))
                    if ok
                    else max(range(len(idx)), key=u.__getitem__)
                )
                assert run["chosen"][method]["point"] == idx[want], method
                assert run["chosen"][method]["qualified"] == bool(ok)
                # the chosen model is measured in full on both sets, test included
                assert "model_utility" in run["chosen"][method]["test"]


def test_intervals_are_t_intervals_over_pipeline_means(study):
    _, record, _ = study
    results = record["results"]
    got = record["summary"]["methods"]["mox"]["test"]["forget_value_prob"]
    means = [
        statistics.fmean(run["chosen"]["mox"]["test"]["forget_value_prob"] for run in r["runs"])
        for r in results
    ]
    low, high = stats.t.interval(0.95, len(means) - 1, loc=np.mean(means), scale=stats.sem(means))
    assert got == pytest.approx([np.mean(means), low, high], rel=1e-9)
    diff = record["summary"]["paired"]["ga"]["forget_quality"][0]
    assert diff == pytest.approx(
        np.mean(
            [
                statistics.fmean(
                    run["chosen"]["mox"]["test"]["forget_quality"]
                    - run["chosen"]["ga"]["test"]["forget_quality"]
                    for run in r["runs"]
                )
                for r in results
            ]
        ),
        abs=1e-12,
    )


def test_a_pretrained_base_replaces_the_tiny_llama_and_its_tokenizer(study, tmp_path):
    """The REAL budget's path (a packaged pretrained model under --work) on a stand-in: every
    pipeline fine-tunes the base itself, read by the base's own tokenizer, with no pretraining."""
    from dataclasses import replace

    from transformers import AutoConfig, AutoTokenizer

    from moxkit.apps.tiny import build_tiny_llama, save_tiny_model
    from moxkit.apps.tofu_mini import write

    module, _, _ = study
    budget = replace(module.QUICK, base="stand-in", pipelines=(0, 1), lrs=(1e-3,))
    work = tmp_path / "work"
    data = write(work / f"data-{budget.authors}", n_authors=budget.authors, vocab_size=300)
    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    hidden = 2 * budget.hidden  # not the tiny Llama the budget would build
    save_tiny_model(
        build_tiny_llama(len(tok), hidden_size=hidden, num_layers=1, seed=7), tok, work / "stand-in"
    )
    record = module.run_budget(budget, "stand_in", tmp_path / "out", work)
    for p in budget.pipelines:
        assert not (work / f"pipeline-{p}" / "base").exists()
        reference = AutoConfig.from_pretrained(work / f"pipeline-{p}" / "reference")
        assert reference.hidden_size == hidden
    assert len(record["results"]) == 2
    assert (tmp_path / "out" / "stand_in_tables.md").is_file()
