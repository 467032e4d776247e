"""Matched forgetting in unlearn: MOX's α and a baseline's stopping point are found so that the
level on the match rows reaches the target; what it cannot do is refused before training."""

from __future__ import annotations

import json

import pytest
import torch

from moxkit.apps.tiny import build_tiny_llama, build_word_tokenizer, save_tiny_model, tiny_facts
from moxkit.errors import MoxError
from moxkit.matching import answer_logprob
from moxkit.train import (
    ExtrapolationConfig,
    MatchConfig,
    TrainConfig,
    extrapolate_model,
    finetune,
    unlearn,
)

FORGET = tiny_facts(8, offset=0)
RETAIN = tiny_facts(16, offset=8)
UNKNOWN = tiny_facts(8, offset=40)
CONFIG = TrainConfig(epochs=6, lr=2e-3, batch_size=4, warmup_epochs=0, progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    rows = FORGET + RETAIN + UNKNOWN
    return build_word_tokenizer([f"{r['question']} {r['answer']}" for r in rows])


@pytest.fixture(scope="module")
def ref(tok):
    model = build_tiny_llama(len(tok), hidden_size=48, num_heads=2, intermediate_size=96)
    config = TrainConfig(epochs=40, lr=1e-2, batch_size=16, warmup_epochs=1, progress=False)
    return finetune(model, FORGET + RETAIN, config=config, tokenizer=tok).model


def level(model, tok, rows=FORGET[:4]):
    return answer_logprob(model, tok, rows)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_mox_alpha_is_matched(ref, tok, tmp_path):
    target = level(ref, tok) - 3.0
    match = MatchConfig(write_rows(tmp_path / "val.jsonl", FORGET[:4]), f"{target!r}")
    result = unlearn(ref, FORGET, RETAIN, method="mox", config=CONFIG, tokenizer=tok,
                     match=match, save_mem=None)  # fmt: skip
    m = result.match
    assert result.alpha == m["strength"] > 0
    assert m["target"] == target and m["level"] <= target and m["gap"] == m["level"] - target
    assert level(result.model, tok) == m["level"]  # the returned model is the matched one
    assert level(ref, tok) > target  # and the reference was not already there


def test_mox_matched_equals_extrapolation_at_that_alpha(ref, tok, tmp_path):
    target = level(ref, tok) - 2.0
    mem = unlearn(ref, FORGET, RETAIN, method="mox", config=CONFIG, tokenizer=tok,
                  extrapolation=ExtrapolationConfig(alpha=1.0),
                  save_mem=tmp_path / "mem")  # fmt: skip
    matched = unlearn(ref, FORGET, RETAIN, method="mox", config=CONFIG, tokenizer=tok,
                      match=MatchConfig(FORGET[:4], str(target)))  # fmt: skip
    from moxkit.hf import load_model

    theta_mem = load_model(tmp_path / "mem", "mem", tokenizer=tok).model
    want = extrapolate_model(ref, theta_mem, matched.alpha)
    for (name, got), (_, exp) in zip(matched.model.named_parameters(),
                                     want.named_parameters(), strict=True):  # fmt: skip
        assert torch.equal(got.float(), exp.float()), name
    del mem


@pytest.mark.parametrize("method", ["ga", "graddiff"])
def test_baseline_stops_at_the_target(ref, tok, method):
    target = level(ref, tok) - 2.0
    result = unlearn(ref, FORGET, RETAIN, method=method, config=CONFIG, tokenizer=tok,
                     match=MatchConfig(FORGET[:4], str(target)))  # fmt: skip
    m = result.match
    assert 0 < m["strength"] <= 1 and m["level"] <= target
    assert result.steps == m["step"] < 12  # stopped at the step that crossed, not the end
    assert level(result.model, tok) == pytest.approx(m["level"], abs=1e-5)


def test_target_from_rows_the_model_does_not_know(ref, tok, tmp_path):
    unknown = write_rows(tmp_path / "unknown.jsonl", UNKNOWN)
    result = unlearn(ref, FORGET, RETAIN, method="mox", config=CONFIG, tokenizer=tok,
                     match=MatchConfig(FORGET[:4], f"unknown:{unknown}"))  # fmt: skip
    assert result.match["target"] == pytest.approx(answer_logprob(ref, tok, UNKNOWN), abs=1e-6)


def test_target_from_another_model(ref, tok, tmp_path):
    other = build_tiny_llama(len(tok), hidden_size=48, num_heads=2, intermediate_size=96, seed=3)
    save_tiny_model(other, tok, tmp_path / "other")
    result = unlearn(ref, FORGET, RETAIN, method="mox", config=CONFIG, tokenizer=tok,
                     match=MatchConfig(FORGET[:4], f"model:{tmp_path / 'other'}"))  # fmt: skip
    assert result.match["target"] == pytest.approx(level(other, tok), abs=1e-5)


def test_unreachable_target_is_one_clear_error(ref, tok, tmp_path):
    with pytest.raises(MoxError, match="did not bring the level to -1e\\+06"):
        unlearn(ref, FORGET, RETAIN, method="ga", config=CONFIG, tokenizer=tok,
                match=MatchConfig(FORGET[:4], "-1e6"), out=tmp_path / "out")  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"match": MatchConfig(FORGET[:4], None)}, "give both, or neither"),
        ({"match": MatchConfig(None, "-3")}, "give both, or neither"),
        ({"match": MatchConfig(FORGET[:4], "nan")}, "must be a finite number"),
        ({"match": MatchConfig(FORGET[:4], "soon")}, "expected a number, model:PATH"),
        ({"match": MatchConfig(FORGET[:4], "model:")}, "needs a path"),
        ({"match": MatchConfig(FORGET[:4], "-3"),
          "extrapolation": ExtrapolationConfig(eta=0.5)}, "does not work with eta"),
        ({"match": MatchConfig(FORGET[:4], "-3"), "target_answer": "no"}, "targeted MOX"),
        ({"match": MatchConfig(FORGET[:4], "-3"),
          "config": TrainConfig(lora=2)}, "does not work with lora"),
    ],
)  # fmt: skip
def test_refused_before_training(ref, tok, kwargs, message):
    kwargs.setdefault("config", CONFIG)
    with pytest.raises(MoxError, match=message):
        unlearn(ref, FORGET, RETAIN, method="mox", tokenizer=tok,
                callbacks=[_FailIfTrained()], **kwargs)  # fmt: skip


class _FailIfTrained:
    """A callback that fails the test if training starts."""

    def __getattr__(self, name):
        if name == "on_train_begin":
            raise AssertionError("training started")
        raise AttributeError(name)


def test_cli_unlearn_matches_and_says_where(ref, tok, tmp_path, cli):
    save_tiny_model(ref, tok, tmp_path / "ref")
    val = write_rows(tmp_path / "val.jsonl", FORGET[:4])
    forget = write_rows(tmp_path / "forget.jsonl", FORGET)
    retain = write_rows(tmp_path / "retain.jsonl", RETAIN)
    target = level(ref, tok) - 3.0
    args = [tmp_path / "ref", "--forget", forget, "--retain", retain, "--epochs", "6", "--lr",
            "2e-3", "--batch-size", "4", "--warmup-epochs", "0", "--match-rows", val,
            "--match-target", f"{target!r}"]  # fmt: skip
    got = cli("unlearn", *args, "-o", tmp_path / "out")
    assert got.code == 0, got.err
    line = next(x for x in got.out.splitlines() if x.startswith("matched: α = "))
    alpha = float(line.split("α = ")[1].split(";")[0])
    log = [json.loads(x) for x in (tmp_path / "out" / "moxkit_log.jsonl").read_text().splitlines()]
    event = next(r for r in log if r.get("event") == "match")
    assert event["target"] == target and event["level"] <= target
    assert alpha == pytest.approx(event["strength"], rel=1e-5)
    from moxkit.hf import load_model

    assert level(load_model(tmp_path / "out", "out").model, tok) == pytest.approx(
        event["level"], abs=1e-5
    )
    # --alpha and matching together: one line, nothing written
    again = cli("unlearn", *args, "--alpha", "2", "-o", tmp_path / "out2")
    assert again.code == 2 and "--alpha and --match-rows: give one" in again.err
    assert not (tmp_path / "out2").exists()
    # the match rows are an input: -o over them is refused
    over = cli("unlearn", *args, "-o", val, "--force")
    assert over.code == 1 and over.err.count("\n") == 1 and "val.jsonl" in over.err
    assert (tmp_path / "val.jsonl").read_text().count("\n") == 4
