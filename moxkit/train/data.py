"""Rows in, padded tensors out: the data pipeline every method shares, so that comparisons
between MOX and the baselines differ only in the loss.

A row is question/answer (the question is the prompt, masked out of the loss), prompt/completion
(the same), or text (every token counts). Forget rows are paired with retain rows by a seeded
sampler that walks the retain set in shuffled passes, so over epochs every retain row is used.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moxkit.errors import MoxError
from moxkit.records import read_records

IGNORE = -100


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
    `name` is the option the data came from (e.g. "--forget"), for error messages."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        records = read_records(path, name)
        rows = [_to_row(rec, f"{path}:{where}") for where, rec in records]
    else:
        rows = [_to_row(rec, f"{name} rows[{i}]") for i, rec in enumerate(data)]
    if not rows:
        raise MoxError(f"{name} {data if isinstance(data, (str, os.PathLike)) else ''}: no rows")
    return rows


def load_answers(path: str | os.PathLike, name: str) -> list[str]:
    """Replacement answers for targeted unlearning, one row per forget row, from the row's
    answer, completion or text field."""
    answers = []
    for where, rec in read_records(Path(path), name):
        text = next((rec.get(k) for k in ("answer", "completion", "text")
                     if isinstance(rec, dict) and k in rec), None)  # fmt: skip
        if not isinstance(text, str) or not text.strip():
            raise MoxError(f"{path}:{where}: needs an answer, completion or text field")
        answers.append(text)
    if not answers:
        raise MoxError(f"{name} {path}: no rows")
    return answers


def _to_row(rec: object, where: str) -> Row:
    if not isinstance(rec, dict):
        raise MoxError(f"{where}: expected an object, got {type(rec).__name__}")
    for prompt_key, completion_key in (("question", "answer"), ("prompt", "completion")):
        if prompt_key in rec or completion_key in rec:
            prompt, completion = rec.get(prompt_key), rec.get(completion_key)
            if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
                raise MoxError(
                    f"{where}: needs both '{prompt_key}' and '{completion_key}' as non-empty text"
                )
            return Row(prompt, completion, where)
    if isinstance(rec.get("text"), str) and rec["text"]:
        return Row("", rec["text"], where)
    raise MoxError(
        f"{where}: missing fields: expected question/answer, prompt/completion or text"
        f" (found {', '.join(map(repr, rec)) or 'none'})"
    )


def encode(rows: Sequence[Row], tokenizer, max_length: int, chat_template: bool) -> list[Example]:
    """Tokenize prompt + completion in one pass and mask the prompt by character offsets, which
    is exact for any fast tokenizer, merges at the boundary included. EOS ends each row."""
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise MoxError("--chat-template: the model's tokenizer has no chat template")
    bos = tokenizer.bos_token
    eos = tokenizer.eos_token_id
    examples = []
    for row in rows:
        prompt = row.prompt
        if chat_template and prompt:
            messages = [{"role": "user", "content": prompt}]
            prompt = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        sep = " " if prompt and not prompt[-1].isspace() else ""
        text = prompt + sep + row.completion
        enc = tokenizer(
            text,
            add_special_tokens=not (bos and text.startswith(bos)),
            return_offsets_mapping=True,
        )
        ids = list(enc["input_ids"])
        boundary = len(prompt)
        labels = [
            tok if start >= boundary and end > start else IGNORE
            for tok, (start, end) in zip(ids, enc["offset_mapping"], strict=True)
        ]
        if eos is not None:
            ids.append(eos)
            labels.append(eos)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            raise MoxError(f"{row.where}: no answer tokens left within --max-length {max_length}")
        examples.append(Example(ids, labels))
    return examples


class PairSampler(torch.utils.data.Sampler):
    """Yields (forget index, retain index or None) in a seeded order: forget rows reshuffled
    each epoch, retain rows drawn from successive shuffled passes. Same seed, same order on
    every process, which is what lets data-parallel runs match single-process runs."""

    def __init__(self, n_forget: int, n_retain: int, seed: int):
        self.n_forget, self.n_retain, self.seed = n_forget, n_retain, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_forget

    def __iter__(self) -> Iterator[tuple[int, int | None]]:
        epoch = self.epoch
        self.epoch += 1  # reshuffle next time even if nobody calls set_epoch
        order = _permutation(self.n_forget, self.seed, 2 * epoch)
        for j, i in enumerate(order):
            if not self.n_retain:
                yield i, None
                continue
            k = epoch * self.n_forget + j
            passes, pos = divmod(k, self.n_retain)
            yield i, _permutation(self.n_retain, self.seed, 2 * passes + 1)[pos]


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: int, stream: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + stream)
    return torch.randperm(n, generator=g).tolist()


class PairDataset(torch.utils.data.Dataset):
    """Indexed by (forget, retain) pairs from PairSampler; `targets` are replacement answers
    aligned with the forget rows (targeted unlearning)."""

    def __init__(
        self,
        forget: list[Example],
        retain: list[Example] | None = None,
        targets: list[Example] | None = None,
        primary: str = "forget",
    ):
        self.forget, self.retain, self.targets = forget, retain or [], targets
        self.primary = primary

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, index: tuple[int, int | None]) -> dict[str, Example]:
        i, r = index
        item = {self.primary: self.forget[i]}
        if r is not None:
            item["retain"] = self.retain[r]
        if self.targets is not None:
            item["target"] = self.targets[i]
        return item


class Collator:
    """Right-pads each group (forget / retain / target) into input_ids, attention_mask, labels."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Example]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for group in items[0]:
            examples = [item[group] for item in items]
            width = max(len(e.input_ids) for e in examples)
            ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
            labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(examples), width), dtype=torch.long)
            for k, e in enumerate(examples):
                n = len(e.input_ids)
                ids[k, :n] = torch.tensor(e.input_ids)
                labels[k, :n] = torch.tensor(e.labels)
                mask[k, :n] = 1
            batch[f"{group}_input_ids"] = ids
            batch[f"{group}_attention_mask"] = mask
            batch[f"{group}_labels"] = labels
        return batch
