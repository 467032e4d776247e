"""The data pipeline and the loss terms, against hand-built cases and fp64 / transformers
oracles. No training here."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moxkit.apps.tiny import build_tiny_llama, build_word_tokenizer
from moxkit.errors import MoxError
from moxkit.text import IGNORE, encode, load_rows
from moxkit.train.data import Collator, PairDataset, PairSampler
from moxkit.train.objectives import (
    default_npo_floor,
    kl_mask,
    npo_loss,
    sequence_kl,
    sequence_logprob,
    sequence_nll,
    simnpo_loss,
)

ROWS = [
    {"question": "Who wrote Dune ?", "answer": "Frank Herbert wrote it ."},
    {"prompt": "The sky is", "completion": "blue ."},
    {"text": "Rain falls on the plain ."},
]


@pytest.fixture(scope="module")
def tok():
    texts = [" ".join(str(v) for v in r.values()) for r in ROWS]
    return build_word_tokenizer(texts)


def test_load_rows_formats_agree(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps(ROWS))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "Q ?", "answer": "A ."}] * 2), parquet)
    from_rows = load_rows(ROWS, "--forget")
    for source in (jsonl, as_json):
        rows = load_rows(source, "--forget")
        assert [(r.prompt, r.completion) for r in rows] == [
            (r.prompt, r.completion) for r in from_rows
        ]
    assert [(r.prompt, r.completion) for r in from_rows] == [
        ("Who wrote Dune ?", "Frank Herbert wrote it ."),
        ("The sky is", "blue ."),
        ("", "Rain falls on the plain ."),
    ]
    assert [(r.prompt, r.completion) for r in load_rows(parquet, "--forget")] == [
        ("Q ?", "A .")
    ] * 2


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"question": "Q"}\n', "d.jsonl:line 1: needs both 'question' and 'answer'"),
        ('{"text": "ok"}\n{"title": "x"}\n', "d.jsonl:line 2: missing fields"),
        ('{"text": "ok"}\n{oops\n', "d.jsonl: line 2: invalid JSON"),
        ("\n\n", "no rows"),
    ],
)
def test_load_rows_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(MoxError, match=message.replace("(", r"\(")):
        load_rows(path, "--forget")


def test_encode_masks_prompt_exactly(tok):
    qa, pc, text = encode(load_rows(ROWS, "x"), tok, 64, chat_template=False)
    words = tok.convert_ids_to_tokens
    # question tokens (and <s>) are masked; the answer and </s> count
    answer = [t for t, lab in zip(qa.input_ids, qa.labels, strict=True) if lab != IGNORE]
    assert words(answer) == ["Frank", "Herbert", "wrote", "it", ".", "</s>"]
    assert [lab for lab in qa.labels if lab != IGNORE] == answer
    assert words([t for t, lab in zip(pc.input_ids, pc.labels, strict=True) if lab != IGNORE]) == [
        "blue",
        ".",
        "</s>",
    ]
    # text rows: every token but <s> counts
    assert text.labels[0] == IGNORE and text.labels[1:] == text.input_ids[1:]
    with pytest.raises(MoxError, match=r"rows\[0\]: no answer tokens left within max_length 4"):
        encode(load_rows(ROWS[:1], "x"), tok, 4, chat_template=False)


def test_encode_with_chat_template(tok):
    (ex,) = encode(load_rows(ROWS[:1], "x"), tok, 64, chat_template=True)
    tokens = tok.convert_ids_to_tokens(ex.input_ids)
    assert tokens[:3] == ["<s>", "user", ":"] and "assistant" in tokens
    first_answer = ex.labels.index(next(lab for lab in ex.labels if lab != IGNORE))
    assert tokens[first_answer - 2 : first_answer] == ["assistant", ":"]


def test_pair_sampler_shuffles_and_covers_retain():
    sampler = PairSampler(n_forget=4, n_retain=6, seed=1)
    epochs = [list(sampler) for _ in range(3)]
    for pairs in epochs:
        assert sorted(i for i, _ in pairs) == [0, 1, 2, 3]
    assert len({tuple(i for i, _ in pairs) for pairs in epochs}) > 1  # reshuffled per epoch
    retain = [r for pairs in epochs for _, r in pairs]  # 12 draws: two full passes over 6
    assert sorted(retain[:6]) == list(range(6)) and sorted(retain[6:]) == list(range(6))
    again = PairSampler(4, 6, seed=1)
    again.set_epoch(1)
    assert list(again) == epochs[1]


def test_collator_pads_and_masks(tok):
    examples = encode(load_rows(ROWS, "x"), tok, 64, chat_template=False)
    dataset = PairDataset(examples[:2], retain=examples[2:])
    batch = Collator(pad_id=tok.pad_token_id)([dataset[(0, 0)], dataset[(1, 0)]])
    ids, mask, labels = (batch[f"forget_{k}"] for k in ("input_ids", "attention_mask", "labels"))
    n_short = len(examples[1].input_ids)
    assert ids.shape == (2, len(examples[0].input_ids))
    assert mask[1].tolist() == [1] * n_short + [0] * (ids.shape[1] - n_short)
    assert (ids[1, n_short:] == tok.pad_token_id).all() and (labels[1, n_short:] == IGNORE).all()
    assert batch["retain_input_ids"].shape[0] == 2


def _batch(tok, seed=0):
    examples = encode(load_rows(ROWS, "x"), tok, 64, chat_template=False)
    batch = Collator(tok.pad_token_id)([{"forget": e} for e in examples])
    model = build_tiny_llama(len(tok), hidden_size=32, num_heads=2, seed=seed)
    with torch.no_grad():
        logits = model(
            input_ids=batch["forget_input_ids"], attention_mask=batch["forget_attention_mask"]
        ).logits
    return model, batch, logits, examples


def test_sequence_nll_matches_transformers_loss(tok):
    model, batch, logits, examples = _batch(tok)
    ours = sequence_nll(logits, batch["forget_labels"])
    with torch.no_grad():  # oracle: each row alone, unpadded, through transformers' own loss
        theirs = [
            model(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss.item()
            for e in examples
        ]
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-5)
    n_answer = [sum(lab != IGNORE for lab in e.labels[1:]) for e in examples]
    np.testing.assert_allclose(
        sequence_logprob(logits, batch["forget_labels"]).numpy(),
        -np.array(theirs) * n_answer,
        rtol=1e-5,
    )


@pytest.mark.parametrize("positions", ["all", "answer"])
def test_sequence_kl_matches_fp64(tok, positions):
    """KL(p_ref ‖ p) per position in fp64, averaged over the chosen positions of each row:
    every real token (TOFU / open-unlearning), or those predicting an answer token."""
    _, batch, logits, examples = _batch(tok, seed=0)
    _, _, ref_logits, _ = _batch(tok, seed=1)
    labels, attention = batch["forget_labels"], batch["forget_attention_mask"]
    mask = kl_mask(labels, attention, positions)
    ours = sequence_kl(ref_logits, logits, mask).numpy()
    lp = torch.log_softmax(logits.double(), -1).numpy()
    lr = torch.log_softmax(ref_logits.double(), -1).numpy()
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        if positions == "all":
            chosen = range(n)
        else:
            chosen = [t for t in range(n - 1) if example.labels[t + 1] != IGNORE]
        kls = [float(np.sum(np.exp(lr[row, t]) * (lr[row, t] - lp[row, t]))) for t in chosen]
        assert ours[row] == pytest.approx(sum(kls) / len(kls), rel=1e-5)
    assert (sequence_kl(logits, logits, mask).abs() < 1e-6).all()


def test_simnpo_loss_matches_formula():
    """SimNPO: −(2/β)·log σ(−(β/|y|)·log p(y|x) − γ) from the mean NLL, in fp64."""
    mean_nll = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)
    for beta, gamma in ((4.5, 0.0), (2.5, 1.0)):
        want = [(2 / beta) * math.log1p(math.exp(-(beta * x - gamma))) for x in mean_nll.tolist()]
        np.testing.assert_allclose(simnpo_loss(mean_nll, beta, gamma).numpy(), want, rtol=1e-12)
    # decreasing in the NLL: descending on it raises the forget NLL
    assert (simnpo_loss(mean_nll, 4.5, 0.0).diff() < 0).all()


def test_npo_loss_and_floor():
    logp = torch.tensor([-3.0, -1.0, -10.0], dtype=torch.float64)
    ref = torch.tensor([-2.0, -2.0, -2.0], dtype=torch.float64)
    beta = 0.1
    expected = [-(2 / beta) * math.log(1 / (1 + math.exp(beta * (a - b)))) for a, b in zip(
        logp.tolist(), ref.tolist(), strict=True)]  # fmt: skip
    np.testing.assert_allclose(npo_loss(logp, ref, beta).numpy(), expected, rtol=1e-12)
    # at log-ratio 0 the loss is (2/β)·log 2
    assert npo_loss(ref, ref, beta)[0].item() == pytest.approx(20 * math.log(2))
    floor = default_npo_floor(beta)
    r = torch.tensor([20.0], dtype=torch.float64)
    assert floor == pytest.approx(-npo_loss(r, torch.zeros(1, dtype=torch.float64), beta).item())


def test_npo_floor_large_beta_does_not_overflow():
    """exp(β·20) overflows a float from β ≈ 35.5 on; the floor is −(2/β)·softplus(20β)."""
    for beta in (40.0, 100.0):
        assert default_npo_floor(beta) == pytest.approx(-40.0, rel=1e-12)
        r = torch.tensor([20.0], dtype=torch.float64)
        assert default_npo_floor(beta) == pytest.approx(
            -npo_loss(r, torch.zeros(1, dtype=torch.float64), beta).item(), rel=1e-12
        )
