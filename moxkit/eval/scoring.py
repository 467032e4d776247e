"""Log-probabilities a causal LM gives to answers and texts, batched with padding masked out.

Everything TOFU and MUSE measure without generating comes down to two quantities: the summed
log-probability of an answer given its question (answer probability, truth ratio) and the
per-token log-probabilities of a text (Min-K% membership scores). Batches are right-padded: for a
causal model right padding leaves every real token's position and context unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..text import IGNORE, Example, Row, encode, pad_id


def prompt_ids(tokenizer, question: str, chat_template: bool = False) -> list[int]:
    """The tokens a question is presented as for generation, formatted as moxkit.text.encode
    formats prompts for training and scoring (the chat template as text, then tokenized, BOS
    not doubled)."""
    if chat_template:
        question = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    bos = tokenizer.bos_token
    return tokenizer(question, add_special_tokens=not (bos and question.startswith(bos)))[
        "input_ids"
    ]


def pair_examples(
    tokenizer, questions: Sequence[str], answers: Sequence[str], chat_template: bool = False
) -> list[Example]:
    """Question/answer pairs encoded exactly as the trainer encodes them (prompt masked, EOS
    ending the answer), so that what is scored is what was trained."""
    rows = [
        Row(q, a, f"item {i + 1}") for i, (q, a) in enumerate(zip(questions, answers, strict=True))
    ]
    return encode(rows, tokenizer, max_length=1 << 30, chat_template=chat_template)


def batched(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def _padded(seqs: Sequence[Sequence[int]], pad: int, device):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def _token_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, with_moments: bool):
    """log p(token_t | tokens_<t) for t ≥ 1, and optionally the mean and std of log p under the
    model's next-token distribution at each position (for Min-K%++)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    if not with_moments:
        return chosen, None, None
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * logp.square()).sum(-1) - mu.square()
    return chosen, mu, var.clamp_min(0).sqrt()


def answer_logprobs(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
    chat_template: bool = False,
) -> list[tuple[float, int]]:
    """(sum of log p over the answer's tokens, EOS included, and their number) per pair."""
    examples = pair_examples(tokenizer, questions, answers, chat_template)
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    for batch in batched(len(examples), batch_size):
        ids, mask = _padded([examples[i].input_ids for i in batch], pad_id(tokenizer), device)
        chosen, _, _ = _token_logprobs(model, ids, mask, with_moments=False)
        for row, i in enumerate(batch):
            scored = torch.tensor(examples[i].labels[1:]) != IGNORE
            n = len(scored)
            out.append((float(chosen[row, :n][scored.to(device)].sum()), int(scored.sum())))
    return out


@dataclass
class TokenStats:
    """Per-token log-probabilities of one text (its first token excluded: nothing predicts it),
    with the mean and std of log p under the model at each position."""

    logprobs: list[float]
    mu: list[float]
    sigma: list[float]


def text_token_stats(
    model, tokenizer, texts: Sequence[str], batch_size: int = 16
) -> list[TokenStats]:
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    device = next(model.parameters()).device
    out: list[TokenStats] = []
    for batch in batched(len(encoded), batch_size):
        ids, mask = _padded([encoded[i] for i in batch], pad_id(tokenizer), device)
        chosen, mu, sigma = _token_logprobs(model, ids, mask, with_moments=True)
        for row, i in enumerate(batch):
            n = len(encoded[i]) - 1
            out.append(
                TokenStats(chosen[row, :n].tolist(), mu[row, :n].tolist(), sigma[row, :n].tolist())
            )
    return out
