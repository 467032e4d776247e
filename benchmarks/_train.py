"""What the training benchmarks share: the two models (the tests' tiny Llama, built and cached
here; SmolLM2-135M from `moxkit model smollm2-135m`), rows that every model cuts to exactly the
sequence length asked, and one arm run as a fresh process whose peak RSS is measured from
outside (_process.measure) and whose figures come back in a JSON file."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

from _pairs import CACHE
from _process import measure

SMOLLM2 = Path(os.environ.get("MOXKIT_SMOLLM2", "/tmp/moxkit-real-model/smollm2-135m"))
RESULT_ENV = "MOXKIT_BENCH_RESULT"  # where a child writes its figures (a JSON file)
_SYLLABLES = "ka lo mi ra su ven to bel dri na qu osk tam pe ri zo".split()
WORDS = sorted({a + b for a in _SYLLABLES for b in _SYLLABLES})  # 256 made-up words


def model_folder(name: str) -> Path:
    """A model as a folder: "tiny" (built once, cached) or "smollm2" (must exist)."""
    if name == "smollm2":
        if not (SMOLLM2 / "config.json").is_file():
            sys.exit(f"{SMOLLM2}: missing; make it with `moxkit model smollm2-135m {SMOLLM2}` "
                     "(or point MOXKIT_SMOLLM2 at such a folder)")  # fmt: skip
        return SMOLLM2
    folder = CACHE / "train" / "tiny"
    if not (folder / "config.json").is_file():
        from moxkit.apps.tiny import build_tiny_llama, build_word_tokenizer, save_tiny_model

        tok = build_word_tokenizer([" ".join(WORDS) + " ? ."], model_max_length=1024)
        model = build_tiny_llama(len(tok), max_position_embeddings=1024)
        save_tiny_model(model, tok, folder)
    return folder


def rows(n: int, offset: int, answer_words: int = 160) -> list[dict]:
    """`n` question/answer rows of made-up words, long enough that encoding cuts every one to
    max_length tokens (so each batch has exactly batch × max_length tokens); deterministic."""
    out = []
    for i in range(offset, offset + n):
        pick = random.Random(i)
        question = " ".join(pick.choices(WORDS, k=6)) + " ?"
        out.append({"question": question, "answer": " ".join(pick.choices(WORDS, k=answer_words))})
    return out


def run_child(script: str, spec: dict, label: str) -> dict:
    """Run `python SCRIPT --child SPEC` as a fresh process; the figures it wrote (report_child)
    plus the measured wall time and peak RSS (the process tree's high-water mark)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    result_file = CACHE / "train-child.json"
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           RESULT_ENV: str(result_file)}  # fmt: skip
    cmd = [sys.executable, script, "--child", json.dumps(spec)]
    run = measure(label, cmd, cold=False, env=env, guard=2 << 30)
    if run.returncode != 0 or not result_file.is_file():
        raise SystemExit(f"{label}: exit {run.returncode}\n{run.output_tail}")
    result = json.loads(result_file.read_text())
    result.update(wall_s=run.seconds, peak_rss_mib=run.peak_rss / 2**20,
                  load_before=run.load_before)  # fmt: skip
    return result


def report_child(result: dict) -> None:
    """The child's figures, written where run_child reads them back."""
    import resource

    result["child_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(os.environ[RESULT_ENV]).write_text(json.dumps(result))
