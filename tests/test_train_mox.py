"""MOX end to end and the baselines, in process, on a tiny Llama that first learns a few dozen
made-up facts. Likelihoods are measured with transformers' own loss, one row at a time; the
momentum result is checked against an fp64 closed form from θ_mem snapshots."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from moxkit.apps.tiny import build_tiny_llama, build_word_tokenizer, save_tiny_model, tiny_facts
from moxkit.text import IGNORE, encode, load_rows
from moxkit.train import (
    ExtrapolationConfig,
    LossConfig,
    TrainConfig,
    extrapolate_model,
    finetune,
    train_mem,
    unlearn,
)

FORGET = tiny_facts(8, offset=0)
RETAIN = tiny_facts(24, offset=8)
IDK = "I don't know ."
MEM = TrainConfig(epochs=8, lr=2e-3, batch_size=8, warmup_epochs=0, progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer([f"{r['question']} {r['answer']}" for r in FORGET + RETAIN] + [IDK])


@pytest.fixture(scope="module")
def ref(tok):
    model = build_tiny_llama(len(tok), hidden_size=48, num_heads=2, intermediate_size=96)
    config = TrainConfig(epochs=60, lr=1e-2, batch_size=16, warmup_epochs=1, progress=False)
    return finetune(model, FORGET + RETAIN, config=config, tokenizer=tok).model


def nll(model, rows, tok):
    """Mean over rows of transformers' per-row answer NLL."""
    examples = encode(load_rows(rows, "rows"), tok, 64, chat_template=False)
    with torch.no_grad():
        losses = [
            model(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss.item()
            for e in examples
        ]
    return sum(losses) / len(losses)


def retain_kl(ref_model, model, tok):
    """KL(p_ref ‖ p) per answer token in fp64, averaged per row then over rows."""
    total = 0.0
    for e in encode(load_rows(RETAIN, "rows"), tok, 64, chat_template=False):
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits.double()[0, :-1], -1)
            lr = torch.log_softmax(ref_model(ids).logits.double()[0, :-1], -1)
        answer = torch.tensor(e.labels[1:]) != IGNORE
        total += ((lr.exp() * (lr - lp)).sum(-1)[answer]).mean().item()
    return total / len(RETAIN)


def test_memorize_then_extrapolate(ref, tok):
    before = {n: p.clone() for n, p in ref.state_dict().items()}
    mem = train_mem(ref, FORGET, RETAIN, config=MEM, tokenizer=tok).model
    assert all(torch.equal(before[n], p) for n, p in ref.state_dict().items())  # input untouched
    f_ref, r_ref = nll(ref, FORGET, tok), nll(ref, RETAIN, tok)
    f_mem = nll(mem, FORGET, tok)
    assert f_mem < f_ref - 0.05  # θ_mem memorized the forget set further
    kl_mem = retain_kl(ref, mem, tok)
    assert kl_mem < 0.5 * (f_ref - f_mem)  # ... while staying close to θ_ref on retain

    # without the KL term (the task-vector run) retain drifts further
    free = train_mem(
        ref, FORGET, None, config=MEM, tokenizer=tok, loss=LossConfig(kl_weight=0)
    ).model
    assert retain_kl(ref, free, tok) > 1.3 * kl_mem

    forget_model = extrapolate_model(ref, mem, alpha=2.0)
    f_for, r_for = nll(forget_model, FORGET, tok), nll(forget_model, RETAIN, tok)
    assert f_for - f_ref > 0.2
    assert f_for - f_ref > 2 * (r_for - r_ref)

    # unlearn(method="mox") is the same pipeline: same θ_mem, same extrapolation
    result = unlearn(
        ref,
        FORGET,
        RETAIN,
        method="mox",
        config=MEM,
        tokenizer=tok,
        extrapolation=ExtrapolationConfig(alpha=2.0),
    )
    for (name, a), b in zip(
        result.model.named_parameters(), forget_model.parameters(), strict=True
    ):
        assert torch.equal(a, b), name


def test_targeted_answer_becomes_likelier(ref, tok):
    idk_rows = [{"question": r["question"], "answer": IDK} for r in FORGET]
    two = ExtrapolationConfig(alpha=2.0)
    result = unlearn(
        ref, FORGET, RETAIN, extrapolation=two, target_answer=IDK, config=MEM, tokenizer=tok
    )
    plain = unlearn(ref, FORGET, RETAIN, extrapolation=two, config=MEM, tokenizer=tok)
    before, after = nll(ref, idk_rows, tok), nll(result.model, idk_rows, tok)
    assert after < before - 1.0
    assert after < nll(plain.model, idk_rows, tok) - 1.0  # the target term, not extrapolation
    assert any("target_nll_at_forget_model" in r for r in result.log)
    # descent at θ_for with the retain KL there too: retain holds as well as without a target
    # (the earlier reading, ascent on the target inside θ_mem, more than doubled it)
    assert nll(result.model, RETAIN, tok) < nll(plain.model, RETAIN, tok) + 0.15


class Snapshots(TrainerCallback):
    """θ_mem after every optimizer step, in fp64."""

    def __init__(self):
        self.at = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.at[state.global_step] = {
            n: p.detach().double().clone() for n, p in model.named_parameters()
        }


def test_momentum_matches_closed_form(ref, tok, tmp_path):
    alpha, eta, every = 2.0, 0.675, 3
    config = TrainConfig(max_steps=8, lr=2e-3, batch_size=4, warmup_epochs=0, progress=False)
    snaps = Snapshots()
    momentum = ExtrapolationConfig(alpha=alpha, eta=eta, extrapolate_every=every)
    result = unlearn(
        ref, FORGET, RETAIN, extrapolation=momentum, config=config, tokenizer=tok, callbacks=[snaps]
    )
    ticks = [r["step"] for r in result.log if r.get("event") in ("momentum", "extrapolate")]
    assert ticks == [3, 6, 8]  # every K steps, and the last step
    theta_ref = {n: p.detach().double() for n, p in ref.named_parameters()}
    t = len(ticks)
    for name, got in result.model.named_parameters():
        r = theta_ref[name]
        # θ_for^T = Σ_s η(1−η)^(T−s)·[(1+α)θ_ref − α·θ_mem^s] + (1−η)^T·θ_ref
        want = (1 - eta) ** t * r
        for s, step in enumerate(ticks, 1):
            want = want + eta * (1 - eta) ** (t - s) * (
                (1 + alpha) * r - alpha * snaps.at[step][name]
            )
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    # momentum matters: the plain extrapolation of the last θ_mem is far from it
    last = snaps.at[8]
    name = "model.layers.0.mlp.up_proj.weight"
    plain = (1 + alpha) * theta_ref[name] - alpha * last[name]
    got = dict(result.model.named_parameters())[name].double()
    assert (plain - got).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disk_path_equals_memory_path(ref, tok, tmp_path, dtype):
    """The on-disk momentum (through moxkit.extrapolate) gives the in-memory result, bit for
    bit, and both come out in the dtype MODEL is stored in."""
    save_tiny_model(copy.deepcopy(ref).to(dtype), tok, tmp_path / "ref")
    config = TrainConfig(max_steps=5, lr=2e-3, batch_size=4, warmup_epochs=0, progress=False)
    outs = {}
    for where in ("memory", "disk"):
        out = tmp_path / where
        momentum = ExtrapolationConfig(
            alpha=4.0, eta=0.5, extrapolate_every=2, extrapolate_on=where
        )
        unlearn(tmp_path / "ref", FORGET, RETAIN, out, extrapolation=momentum, config=config)
        outs[where] = load_file(out / "model.safetensors")
        assert {t.dtype for t in outs[where].values()} == {dtype}
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert outs["memory"].keys() == outs["disk"].keys()
    for name in outs["memory"]:
        assert torch.equal(outs["memory"][name], outs["disk"][name]), name


def test_baselines_move_forget_nll_up(ref, tok):
    f_ref = nll(ref, FORGET, tok)
    short = TrainConfig(max_steps=3, lr=3e-3, batch_size=8, warmup_epochs=0, progress=False)
    for method in ("ga", "graddiff", "npo"):
        model = unlearn(ref, FORGET, RETAIN, method=method, config=short, tokenizer=tok).model
        assert nll(model, FORGET, tok) > f_ref + 0.3, method
    tv = unlearn(
        ref,
        FORGET,
        None,
        method="task-vector",
        config=MEM,
        tokenizer=tok,
        extrapolation=ExtrapolationConfig(alpha=2.0),
    )
    assert nll(tv.model, FORGET, tok) > f_ref + 0.2
    assert [r["step"] for r in tv.log if "retain_kl" in r] == []  # no KL term


def test_gradient_ascent_utility_falls_with_steps(ref, tok):
    retain_nll = []
    for steps in (2, 4, 8):
        config = TrainConfig(max_steps=steps, lr=3e-3, batch_size=8, warmup_epochs=0,
                             progress=False)  # fmt: skip
        model = unlearn(ref, FORGET, None, method="ga", config=config, tokenizer=tok).model
        retain_nll.append(nll(model, RETAIN, tok))
    assert nll(ref, RETAIN, tok) < retain_nll[0] < retain_nll[1] < retain_nll[2]


def test_continual_reference_stays_theta_ref(ref, tok):
    """--init-from starts training at an earlier θ_mem, but the KL is still to θ_ref: the first
    step's retain KL is that θ_mem's distance, not zero."""
    first = train_mem(ref, FORGET[:4], RETAIN, config=MEM, tokenizer=tok)
    again = train_mem(ref, FORGET[4:], RETAIN, config=MEM, tokenizer=tok, init_from=first.model)
    fresh = train_mem(ref, FORGET[4:], RETAIN, config=MEM, tokenizer=tok)
    assert fresh.log[0]["retain_kl"] < 1e-9
    assert again.log[0]["retain_kl"] > 1e-4


def test_lora_reference_is_base_model(ref, tok):
    pytest.importorskip("peft")
    config = TrainConfig(epochs=16, lr=1e-2, batch_size=4, warmup_epochs=0, lora=4,
                         progress=False)  # fmt: skip
    result = train_mem(ref, FORGET, RETAIN, config=config, tokenizer=tok)
    # LoRA's B starts at zero: at step 1 the model is the base, so the KL to the reference is 0
    assert result.log[0]["retain_kl"] < 1e-9
    assert nll(result.model, FORGET, tok) < nll(ref, FORGET, tok) - 0.02
    assert set(dict(result.model.named_parameters())) == set(dict(ref.named_parameters()))


def test_in_memory_extrapolation_shares_the_frozen_reference(ref):
    """θ_ref for the in-memory extrapolation is the loss's frozen reference itself where that
    already holds CPU fp32 tensors (one model copy less), and a copy of MODEL's otherwise."""
    from moxkit.train.momentum import reference_state

    frozen = copy.deepcopy(ref).eval().requires_grad_(False)
    shared = reference_state(frozen, ref)
    assert shared.keys() == dict(frozen.named_parameters()).keys()
    for name, p in frozen.named_parameters():
        assert shared[name].data_ptr() == p.data_ptr(), name
    for reference in (copy.deepcopy(ref).to(torch.bfloat16), None):
        copied = reference_state(reference, ref)
        for name, p in ref.named_parameters():
            assert copied[name].dtype == torch.float32 and torch.equal(copied[name], p.detach())
            assert copied[name].data_ptr() != p.data_ptr(), name
