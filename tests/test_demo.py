"""`moxkit demo --quick`: the whole pipeline end to end, each method's setting chosen on the
validation authors as the rule says, the test numbers consistent with the saved reports, reruns
reusing what was trained, and a readable plot on disk."""

import json

import pytest
from scipy.stats import ks_2samp

from moxkit.apps.demo import QUICK, run_demo
from moxkit.apps.study import KEEP
from moxkit.cli.main import main
from moxkit.errors import MoxError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    logs: list[str] = []
    result = run_demo(out, QUICK, progress=False, log=logs.append)
    return out, result, logs


def test_demo_table_plot_and_reports(demo):
    out, result, logs = demo
    names = [r["name"] for r in result.rows]
    assert names == ["retain-only (target)", "reference (before)", *QUICK.methods]
    for name in names:
        assert name in result.table
    assert "FQ↑" in result.table and "MU↑" in result.table
    import matplotlib.pyplot as plt

    image = plt.imread(result.plot)
    assert image.shape[0] > 300 and image.shape[1] > 300
    # every forget quality is the KS p-value of the saved test truth ratios against the
    # retain-only model's, and the test set is the split's, not the validation one
    retain_items = json.loads((out / "reports" / "retain.json").read_text())["sets"]["forget"]
    retain_tr = [i["truth_ratio"] for i in retain_items["items"]]
    for row in result.rows[1:]:
        rep = json.loads((out / "reports" / f"{row['name'].split(' ')[0]}.json").read_text())
        assert rep["data"] == str(out / "data" / QUICK.split)
        tr = [i["truth_ratio"] for i in rep["sets"]["forget"]["items"]]
        assert row["forget_quality"] == pytest.approx(ks_2samp(tr, retain_tr).pvalue)
    assert result.rows[0]["forget_quality"] == 1.0
    assert any("unlearning with mox" in m for m in logs)


def test_demo_settings_follow_the_rule_on_validation(demo):
    out, result, _ = demo
    for method in QUICK.methods:
        sweep = json.loads((out / "reports" / f"{method}.sweep.json").read_text())
        points = sweep["points"]
        assert len(points) == (
            len(QUICK.alphas) if method == "mox" else len(QUICK.unlearn_lrs) * QUICK.unlearn_epochs
        )
        # brute force: highest validation FQ among points keeping KEEP × the reference's U
        u = [2 / (1 / p["val"]["retain_prob"] + 1 / p["val"]["general_prob"]) for p in points]
        ok = [i for i in range(len(points)) if u[i] >= KEEP * sweep["reference_utility"]]
        want = (
            max(ok, key=lambda i: (points[i]["val"]["forget_quality"], u[i]))
            if ok
            else max(range(len(points)), key=u.__getitem__)
        )
        assert sweep["chosen"] == want and sweep["qualified"] == bool(ok)
        row = next(r for r in result.rows if r["name"] == method)
        knob = points[want].get("alpha")
        assert (f"α {knob:g}" if method == "mox" else f"epoch {points[want]['epoch']}") in row[
            "setting"
        ]


def test_demo_rerun_reuses_and_refuses_other_settings(demo, capsys):
    out, result, _ = demo
    weights = out / "models" / "mox" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    logs: list[str] = []
    again = run_demo(out, QUICK, progress=False, log=logs.append)
    assert not any("training" in m or "evaluating" in m or "unlearning" in m for m in logs)
    assert again.rows == result.rows and weights.stat().st_mtime_ns == stamp
    with pytest.raises(MoxError, match="other settings"):
        run_demo(
            out,
            QUICK.__class__(**{**QUICK.__dict__, "unlearn_lrs": (2e-3,)}),
            progress=False,
            log=logs.append,
        )
    main(["demo", "--quick", "-o", str(out), "-q"])  # the CLI prints the reused comparison
    printed = capsys.readouterr().out
    assert "reference (before)" in printed and "demo.png" in printed
