"""Layers point one way: evaluation never loads the trainer. `import moxkit.eval.evaluate`
pulls in neither moxkit.train, transformers nor accelerate, and a whole evaluation loads no
moxkit.train and no transformers Trainer. (accelerate itself does get imported once a model is
loaded: transformers' modeling code imports it whenever it is installed.)"""

import json
import subprocess
import sys

from moxkit.apps.tiny import build_tiny_llama, build_word_tokenizer, save_tiny_model

ROW = {
    "question": "Where was Ana born ?",
    "answer": "Ana was born in Rome .",
    "paraphrased_answer": "Rome is where Ana was born .",
    "perturbed_answer": ["Ana was born in Oslo .", "Ana was born in Lima ."],
}

PROBE = """
import json, sys
import moxkit.eval.evaluate as ev
on_import = sorted(m for m in ("moxkit.train", "transformers", "accelerate") if m in sys.modules)
report = ev.evaluate(sys.argv[1], sys.argv[2], cfg=ev.EvalConfig(max_new_tokens=2),
                     device="cpu", progress=False)
after_eval = sorted(m for m in sys.modules
                    if m.startswith("moxkit.train") or m.startswith("transformers.trainer"))
print(json.dumps({"on_import": on_import, "after_eval": after_eval,
                  "forget_prob": report["summary"]["forget_prob"]}))
"""


def test_eval_loads_no_trainer(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "forget.jsonl").write_text(json.dumps(ROW) + "\n")
    tok = build_word_tokenizer(
        [v for v in ROW.values() if isinstance(v, str)] + ROW["perturbed_answer"]
    )
    model = save_tiny_model(build_tiny_llama(len(tok), seed=1), tok, tmp_path / "model")
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(model), str(data)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["on_import"] == [] and seen["after_eval"] == []
    assert 0 < seen["forget_prob"] < 1  # the evaluation did run


CLI_PROBE = """
import sys
from moxkit.cli.main import main
for argv in (["eval", sys.argv[1], "--data", sys.argv[2]],
             ["eval", sys.argv[3], "--data", sys.argv[2], "--retain-model", "missing.json"],
             ["sweep", sys.argv[1], sys.argv[1], "--data", sys.argv[2]]):
    try:
        main(argv)
    except SystemExit:
        pass
print("torch" in sys.modules)
"""


def test_bad_arguments_fail_before_torch_is_imported(tmp_path):
    """A typo costs a second, not the ~10 s torch and transformers take to import."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "forget.jsonl").write_text(json.dumps(ROW) + "\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    done = subprocess.run(
        [sys.executable, "-c", CLI_PROBE, str(tmp_path / "missing"), str(data), str(model)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    errors = done.stderr.strip().splitlines()
    assert errors[0].startswith("moxkit: error: MODEL") and "missing" in errors[0]
    assert "--retain-model missing.json: no such file or directory" in errors[1]
    assert errors[2].startswith("moxkit: error: REF") and len(errors) == 3
    assert done.stdout.strip() == "False"
