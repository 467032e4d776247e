"""The methods as the paper describes them: the momentum schedule (η matters, η = 1 is plain
MOX), the retain KL over every position, SimNPO, and the METHODS table's checks. Tiny Llama
from config, fp64 oracles; each test trains a few steps only."""

import math

import pytest
import torch

from moxkit.apps.tiny import build_tiny_llama, build_word_tokenizer, tiny_facts
from moxkit.engine.formula import PAPER_ETA
from moxkit.errors import MoxError
from moxkit.text import encode, load_rows
from moxkit.train import (
    METHODS,
    ExtrapolationConfig,
    LossConfig,
    TrainConfig,
    finetune,
    train_mem,
    unlearn,
)
from moxkit.train.data import PairSampler
from moxkit.train.momentum import DEFAULT_TICKS

FORGET = tiny_facts(8, offset=0)
RETAIN = tiny_facts(16, offset=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer([f"{r['question']} {r['answer']}" for r in FORGET + RETAIN])


@pytest.fixture(scope="module")
def ref(tok):
    model = build_tiny_llama(len(tok), hidden_size=32, num_heads=2, intermediate_size=64)
    config = TrainConfig(epochs=20, lr=1e-2, batch_size=8, warmup_epochs=1, progress=False)
    return finetune(model, FORGET + RETAIN, config=config, tokenizer=tok).model


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def test_momentum_default_schedule_and_eta(ref, tok):
    """Ticks every ceil(steps / DEFAULT_TICKS) steps by default (not once per epoch), η = 1
    is plain MOX bit for bit, and η changes the model: the paper's η and a small η give
    forget models that differ from plain MOX and from each other."""
    config = TrainConfig(epochs=2, lr=3e-3, batch_size=2, warmup_epochs=0.5, progress=False)
    total = 2 * len(FORGET) // 2  # 8 steps
    every = math.ceil(total / DEFAULT_TICKS)

    def run(eta):
        ext = ExtrapolationConfig(alpha=2.0, eta=eta)
        return unlearn(ref, FORGET, RETAIN, config=config, tokenizer=tok, extrapolation=ext)

    plain, one, paper, small = run(None), run(1.0), run(PAPER_ETA), run(0.2)
    ticks = [r["step"] for r in paper.log if r.get("event") in ("momentum", "extrapolate")]
    assert ticks == list(range(every, total + 1, every))
    assert len(ticks) == DEFAULT_TICKS
    for a, b in zip(plain.model.parameters(), one.model.parameters(), strict=True):
        assert torch.equal(a, b)
    base, theta_ref = flat(plain.model), flat(ref)
    scale = (base - theta_ref).norm()
    d_paper = (flat(paper.model) - base).norm() / scale
    d_small = (flat(small.model) - base).norm() / scale
    assert d_paper > 0.02 and d_small > d_paper + 0.1


def test_retain_kl_covers_every_position_by_default(ref, tok):
    """The first step's logged retain KL (θ ≠ θ_ref thanks to init_from) is the fp64 KL
    averaged over every position of the retain rows in that batch (TOFU's definition); with
    kl_positions="answer" only the answer-predicting positions count."""
    other = build_tiny_llama(len(tok), hidden_size=32, num_heads=2, intermediate_size=64, seed=3)
    config = TrainConfig(max_steps=1, lr=1e-9, batch_size=8, warmup_epochs=0, progress=False)
    retain_rows = [RETAIN[i] for _, i in list(PairSampler(len(FORGET), len(RETAIN), 0))[:8]]
    examples = encode(load_rows(retain_rows, "rows"), tok, 512, chat_template=False)
    per_row = {"all": [], "answer": []}
    for e in examples:
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            lp = torch.log_softmax(other(ids).logits.double()[0], -1)
            lr = torch.log_softmax(ref(ids).logits.double()[0], -1)
        kl = (lr.exp() * (lr - lp)).sum(-1)
        per_row["all"].append(kl.mean().item())
        answer = [t for t in range(len(e.input_ids) - 1) if e.labels[t + 1] != -100]
        per_row["answer"].append(kl[answer].mean().item())
    for positions in ("all", "answer"):
        loss = LossConfig() if positions == "all" else LossConfig(kl_positions="answer")
        result = train_mem(ref, FORGET, RETAIN, config=config, tokenizer=tok, loss=loss,
                           init_from=other)  # fmt: skip
        want = sum(per_row[positions]) / len(per_row[positions])
        assert result.log[0]["retain_kl"] == pytest.approx(want, rel=1e-4), positions
    assert per_row["all"] != pytest.approx(per_row["answer"], rel=1e-2)


def test_simnpo_baseline(ref, tok):
    assert METHODS["simnpo"].retain_loss == "nll" and not METHODS["simnpo"].extrapolates
    config = TrainConfig(max_steps=6, lr=1e-2, batch_size=8, warmup_epochs=0, progress=False)
    result = unlearn(ref, FORGET, RETAIN, method="simnpo", config=config, tokenizer=tok,
                     loss=LossConfig(simnpo_beta=2.5, simnpo_gamma=0.5))  # fmt: skip
    first, last = result.log[0], result.log[-1]
    assert {"forget_simnpo", "retain_nll"} <= set(first)
    assert last["forget_nll"] > first["forget_nll"] + 0.2
    # the logged loss is the formula applied to the batch's per-row NLLs: bounded by its value
    # at the batch-mean NLL (Jensen; the loss is convex in the NLL)
    bound = (2 / 2.5) * math.log1p(math.exp(-(2.5 * first["forget_nll"] - 0.5)))
    assert bound <= first["forget_simnpo"] + 1e-6
    with pytest.raises(MoxError, match="retain: needed by method simnpo"):
        unlearn(ref, FORGET, None, method="simnpo", config=config, tokenizer=tok)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"method": "ga", "extrapolation": ExtrapolationConfig(alpha=2.0)},
            "alpha 2.0: not used by method ga",
        ),
        (
            {"method": "graddiff", "loss": LossConfig(kl_weight=0.5)},
            "kl_weight 0.5: not used by method graddiff",
        ),
        (
            {"method": "npo", "target_answer": "no"},
            "target_answer: only for methods mox, mox-targeted",
        ),
        (
            {"method": "mox", "extrapolation": ExtrapolationConfig(eta=1.5)},
            "eta 1.5: must be at most 1",
        ),
        ({"method": "memorize"}, "method 'memorize': expected one of mox, task-vector"),
        (
            {"method": "mox", "loss": LossConfig(kl_positions="some")},
            "kl_positions 'some': expected one of all, answer",
        ),
    ],
)
def test_methods_refuse_settings_they_ignore(tok, kwargs, message):
    """Checked before any model is loaded (the model here is not even a model)."""
    with pytest.raises(MoxError, match=message):
        unlearn(object(), FORGET, RETAIN, tokenizer=tok, **kwargs)
