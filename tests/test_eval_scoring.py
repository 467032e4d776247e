"""Answer and text log-probabilities against a model whose probabilities are known exactly (a
bigram table), and batched greedy generation against one-prompt-at-a-time argmax decoding."""

from types import SimpleNamespace

import pytest
import torch

from moxkit.apps.tiny import EOS_ID, build_tiny_llama, build_word_tokenizer
from moxkit.eval.generation import greedy_answers, greedy_generate_ids
from moxkit.eval.scoring import answer_logprobs, text_token_stats

TEXTS = [
    "Where was Ana born ?",
    "Ana was born in Rome .",
    "Bo was born in Oslo .",
    "When was Bo born ?",
    "Rome Oslo Paris .",
]


class Bigram(torch.nn.Module):
    """Next-token logits depend only on the current token: P(b | a) = softmax(table[a])[b]."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g, dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(TEXTS)


def _oracle_logprob(table: torch.Tensor, ids: list[int], first_answer: int) -> float:
    logp = torch.log_softmax(table.double(), dim=-1)
    return sum(float(logp[ids[t - 1], ids[t]]) for t in range(first_answer, len(ids)))


def test_answer_logprobs_match_bigram_oracle(tok):
    model = Bigram(len(tok))
    qs = ["Where was Ana born ?", "When was Bo born ?", "Where was Ana born ?"]
    ans = ["Ana was born in Rome .", "Bo was born in Oslo .", "Paris"]
    got = answer_logprobs(model, tok, qs, ans, batch_size=2)  # two batches, padded
    for (lp, n), q, a in zip(got, qs, ans, strict=True):
        q_ids = tok(q)["input_ids"]
        ids = q_ids + tok(a, add_special_tokens=False)["input_ids"] + [EOS_ID]
        assert n == len(ids) - len(q_ids)  # answer tokens and EOS
        assert lp == pytest.approx(_oracle_logprob(model.table.data, ids, len(q_ids)), abs=1e-9)


def test_text_token_stats_match_bigram_oracle(tok):
    model = Bigram(len(tok), seed=1)
    texts = ["Ana was born in Rome .", "Rome ."]
    stats = text_token_stats(model, tok, texts, batch_size=2)
    logp = torch.log_softmax(model.table.data, dim=-1)
    for s, text in zip(stats, texts, strict=True):
        ids = tok(text)["input_ids"]
        assert len(s.logprobs) == len(ids) - 1
        for t in range(1, len(ids)):
            row = logp[ids[t - 1]]
            mu = float((row.exp() * row).sum())
            sigma = float(((row.exp() * row.square()).sum() - mu**2).sqrt())
            assert s.logprobs[t - 1] == pytest.approx(float(row[ids[t]]), abs=1e-9)
            assert s.mu[t - 1] == pytest.approx(mu, abs=1e-9)
            assert s.sigma[t - 1] == pytest.approx(sigma, abs=1e-9)


def _argmax_decode(model, ids: list[int], max_new: int) -> list[int]:
    """The oracle: one prompt, no padding, no cache, full forward and argmax each step."""
    out = []
    seq = list(ids)
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == EOS_ID:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


def test_batched_greedy_generation_equals_unpadded_argmax(tok):
    model = build_tiny_llama(len(tok), seed=3).eval()
    prompts = [
        tok(t)["input_ids"]
        for t in [
            "Ana",
            "Where was Ana born ?",
            "Bo was born in",
            "When was Bo born ? Rome Oslo Paris .",
        ]
    ]
    got = greedy_generate_ids(model, tok, prompts, max_new_tokens=6, batch_size=4)
    want = [_argmax_decode(model, p, 6) for p in prompts]
    assert got == want
    answers = greedy_answers(model, tok, ["Ana", "Where was Ana born ?"], max_new_tokens=6)
    assert answers == [tok.decode(w, skip_special_tokens=True).strip() for w in want[:2]]
