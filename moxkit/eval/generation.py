"""Batched greedy generation. Prompts of different lengths are left-padded, so every prompt
ends at the same column and new tokens are appended right after it; the attention mask hides the
padding and transformers derives position ids from it, so a batched answer equals the answer the
prompt gets alone."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..text import pad_id
from .scoring import batched, prompt_ids


@torch.inference_mode()
def greedy_generate_ids(
    model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 32
) -> list[list[int]]:
    """Greedy continuations (token ids, cut at the first EOS) of tokenised prompts."""
    pad, eos = pad_id(tokenizer), tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for batch in batched(len(prompts), batch_size):
        seqs = [list(prompts[i]) for i in batch]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for row in gen[:, width:].tolist():
            out.append(row[: row.index(eos)] if eos in row else row)
    return out


def greedy_answers(
    model,
    tokenizer,
    questions: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    chat_template: bool = False,
) -> list[str]:
    """Greedy answers to questions, decoded without special tokens."""
    prompts = [prompt_ids(tokenizer, q, chat_template) for q in questions]
    ids = greedy_generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size)
    return [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]


def few_shot_prompt(examples: Sequence[dict], question: str) -> str:
    """MUSE's KnowMem prompt: each in-context example as "Question: q\\nAnswer: a\\n\\n", then
    the question in the same form, the answer left open."""
    shots = "".join(f"Question: {ex['question']}\nAnswer: {ex['answer']}\n\n" for ex in examples)
    return shots + f"Question: {question}\nAnswer: "


def cut_at_next_question(text: str) -> str:
    """A few-shot answer up to where the model starts the next example (MUSE's stop words)."""
    for stop in ("\n\n", "\nQuestion", "Question:"):
        text = text.split(stop)[0]
    return text


def greedy_text_continuations(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32
) -> list[str]:
    """Greedy continuations of raw-text prompts (special tokens added as the tokenizer does),
    decoded as MUSE decodes them."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    out = greedy_generate_ids(model, tokenizer, ids, max_new_tokens, batch_size)
    return [decode_as_muse(tokenizer, x) for x in out]


def decode_as_muse(tokenizer, ids: Sequence[int]) -> str:
    """Token ids as MUSE decodes them: special tokens dropped, tokenization spaces cleaned."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
