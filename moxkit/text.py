"""Text data shared by training and evaluation: rows in, token ids with masked prompts out.

A row is question/answer (the question is the prompt, masked out of the loss), prompt/completion
(the same), or text (every token counts). Training and evaluation both encode with `encode`, so
what is scored is exactly what was trained. Deliberately light: no torch, Trainer or accelerate
import, so `moxkit eval` never pays for the trainer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .records import read_records

IGNORE = -100  # label of a token outside the loss (prompt, padding): PyTorch's ignore_index

# A field is cut to this many characters per token of max_length before tokenising: far more
# than any tokenizer's longest token, so the first max_length tokens are unchanged, while a
# 100 MB row costs a tokenizer call on ~32 k characters instead of gigabytes of offsets.
CHARS_PER_TOKEN_CAP = 64


@dataclass(frozen=True)
class Row:
    prompt: str
    completion: str
    where: str  # "file:line" (or "rows[i]") for error messages


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens


def load_rows(data: str | os.PathLike | Sequence[dict], name: str) -> list[Row]:
    """Read JSONL, JSON (a list of objects) or Parquet, or take rows given directly.
    `name` is the parameter the data came from (e.g. "forget"), for error messages."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        rows = [_to_row(rec, f"{path}:{where}") for where, rec in read_records(path, name)]
    else:
        rows = [_to_row(rec, f"{name} rows[{i}]") for i, rec in enumerate(data)]
    if not rows:
        raise InputError(f"{name} {data if isinstance(data, (str, os.PathLike)) else ''}: no rows",
                         params=(name,))  # fmt: skip
    return rows


def load_answers(path: str | os.PathLike, name: str) -> list[str]:
    """Replacement answers for targeted unlearning, one row per forget row, from the row's
    answer, completion or text field."""
    answers = []
    for where, rec in read_records(Path(path), name):
        text = next((rec.get(k) for k in ("answer", "completion", "text")
                     if isinstance(rec, dict) and k in rec), None)  # fmt: skip
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}:{where}: needs an answer, completion or text field")
        answers.append(_valid_text(text, f"{path}:{where}"))
    if not answers:
        raise InputError(f"{name} {path}: no rows", params=(name,))
    return answers


def _valid_text(text: str, where: str) -> str:
    """Tokenizers cannot take lone surrogates (JSON's "\\ud800" escapes make them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"{where}: not valid Unicode text (lone surrogate at character {exc.start})"
        ) from None
    return text


def _to_row(rec: object, where: str) -> Row:
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected an object, got {type(rec).__name__}")
    for prompt_key, completion_key in (("question", "answer"), ("prompt", "completion")):
        if prompt_key in rec or completion_key in rec:
            prompt, completion = rec.get(prompt_key), rec.get(completion_key)
            if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
                raise InputError(
                    f"{where}: needs both '{prompt_key}' and '{completion_key}' as non-empty text"
                )
            return Row(_valid_text(prompt, where), _valid_text(completion, where), where)
    if isinstance(rec.get("text"), str) and rec["text"]:
        return Row("", _valid_text(rec["text"], where), where)
    found = ", ".join(repr(str(k)[:40]) for k in list(rec)[:10]) or "none"
    raise InputError(
        f"{where}: missing fields: expected question/answer, prompt/completion or text"
        f" (found {found})"
    )


def token_span(text: str, start: int, end: int) -> tuple[int, int] | None:
    """The characters a token spells in `text`, from its offsets [start, end), without the
    whitespace at either end; None for a token of whitespace only (or none: a special token's
    (0, 0)). Tokenizers put a word's space in different places: byte-level BPE (GPT-2, SmolLM2,
    Llama-3: "Ġpoetry") holds it in the word's offsets, sentencepiece ("▁poetry") may or may not,
    word-level never. Stripped, they agree on which characters a token spells, so a test of
    whether a token lies in a span of the text means the same for all of them."""
    s, e = start, end
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return (s, e) if s < e else None


def encode(rows: Sequence[Row], tokenizer, max_length: int, chat_template: bool) -> list[Example]:
    """Tokenize prompt + completion in one pass and mask the prompt by character offsets, which
    is exact for any fast tokenizer, merges at the boundary included. EOS ends each row; rows
    are cut to max_length tokens (fields are cut to CHARS_PER_TOKEN_CAP characters per token
    first, so the cost of a row is bounded whatever its size)."""
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise InputError("chat_template: the model's tokenizer has no chat template",
                         params=("chat_template",))  # fmt: skip
    bos = tokenizer.bos_token
    eos = tokenizer.eos_token_id
    cap = CHARS_PER_TOKEN_CAP * max_length + 1024
    examples = []
    for row in rows:
        prompt = row.prompt[:cap]
        if chat_template and prompt:
            messages = [{"role": "user", "content": prompt}]
            prompt = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        sep = " " if prompt and not prompt[-1].isspace() else ""
        text = prompt + sep + row.completion[:cap]
        enc = tokenizer(
            text,
            add_special_tokens=not (bos and text.startswith(bos)),
            return_offsets_mapping=True,
        )
        ids = list(enc["input_ids"])
        # A token is the answer's when what it spells starts after the prompt: the answer's
        # first token may hold the prompt's last space ("Q: " + "Paris" -> "ĠParis").
        # Whitespace-only tokens go by their offsets (they are trained on, as any other).
        boundary = len(prompt)
        labels = []
        for tok, (start, end) in zip(ids, enc["offset_mapping"], strict=True):
            chars = token_span(text, start, end)
            first = chars[0] if chars else start
            labels.append(tok if end > start and first >= boundary else IGNORE)
        if eos is not None:
            ids.append(eos)
            labels.append(eos)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            raise InputError(f"{row.where}: no answer tokens left within max_length {max_length}",
                             params=("max_length",))  # fmt: skip
        examples.append(Example(ids, labels))
    return examples


def pad_id(tokenizer) -> int:
    """Padding id for batches (masked out everywhere); EOS stands in when there is none."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has neither a pad nor an eos token to pad batches with")
    return tokenizer.eos_token_id
