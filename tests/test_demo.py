"""`moxkit demo --quick`: the whole pipeline end to end, its numbers consistent with the saved
per-model reports, reruns reusing what was trained, and a readable plot on disk."""

import json

import pytest
from moxkit.cli.main import main
from scipy.stats import ks_2samp

from moxkit.demo import QUICK, run_demo
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
    # every forget quality is the KS p-value of the saved truth ratios against the retain model's
    retain_items = json.loads((out / "reports" / "retain.json").read_text())["sets"]["forget"]
    retain_tr = [i["truth_ratio"] for i in retain_items["items"]]
    for row in result.rows[1:]:
        rep = json.loads((out / "reports" / f"{row['name'].split(' ')[0]}.json").read_text())
        tr = [i["truth_ratio"] for i in rep["sets"]["forget"]["items"]]
        assert row["forget_quality"] == pytest.approx(ks_2samp(tr, retain_tr).pvalue)
    assert result.rows[0]["forget_quality"] == 1.0
    assert any("training mox" in m for m in logs)


def test_demo_rerun_reuses_and_refuses_other_settings(demo, capsys):
    out, result, _ = demo
    weights = out / "models" / "mox" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    logs: list[str] = []
    again = run_demo(out, QUICK, progress=False, log=logs.append)
    assert not any("training" in m or "evaluating" in m for m in logs)
    assert again.rows == result.rows and weights.stat().st_mtime_ns == stamp
    with pytest.raises(MoxError, match="other settings"):
        run_demo(out, QUICK.__class__(**{**QUICK.__dict__, "alpha": 2.0}), progress=False,
                 log=logs.append)
    main(["demo", "--quick", "-o", str(out), "-q"])  # the CLI prints the reused comparison
    printed = capsys.readouterr().out
    assert "reference (before)" in printed and "demo.png" in printed
