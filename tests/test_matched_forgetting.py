"""moxkit.apps.study_report's matched forgetting (studies/matched_forgetting.py): the retain
kept at equal forgetting, per pipeline, read off a study's sweeps exactly as its docstring
defines it."""

import json
import math

from moxkit.apps import study_report


def _pt(method, forget, kept):
    return {"method": method, "val": {"forget_value_prob": forget, "retain_prob": kept}}


def test_scores_are_the_best_retain_among_points_that_forget_at_least_that_far(tmp_path):
    record = {
        "results": [
            {
                "pipeline": 0,
                "retain_only": {"val": {"forget_value_prob": 0.6, "retain_prob": 0.9}},
                "runs": [  # two seeds: pooled within the pipeline
                    {"points": [_pt("mox", 0.58, 0.8), _pt("mox", 0.44, 0.7), _pt("ga", 0.5, 0.3)]},
                    {"points": [_pt("mox", 0.49, 0.75), _pt("ga", 0.41, 0.6)]},
                ],
            },
            {
                "pipeline": 1,
                "retain_only": {"val": {"forget_value_prob": 0.6, "retain_prob": 0.9}},
                "runs": [{"points": [_pt("mox", 0.62, 0.85), _pt("ga", 0.39, 0.1)]}],
            },
        ]
    }
    got = study_report.matched(record, levels=(0.6, 0.5, 0.45, 0.4))

    def same(values, want):
        pairs = zip(values, want, strict=True)
        return all((math.isnan(v) and math.isnan(w)) or v == w for v, w in pairs)

    nan = math.nan
    assert same(got["mox"][0.6], [0.8, nan])  # pipeline 1's only MOX point forgets too little
    assert same(got["mox"][0.5], [0.75, nan]) and same(got["mox"][0.45], [0.7, nan])
    assert same(got["mox"][0.4], [nan, nan])
    assert same(got["ga"][0.5], [0.6, 0.1])  # seeds pooled: the second seed's point wins
    assert same(got["ga"][0.4], [nan, 0.1])
    path = tmp_path / "study.json"
    path.write_text(json.dumps(record))
    out = study_report.write_matched(path)
    text = out.read_text()
    assert out.name == "study_matched.md"
    assert "| ga | 0.600 / 0.100 (mean 0.350) |" in text
