"""Batches for training: forget rows paired with retain rows by a seeded sampler that walks the
retain set in shuffled passes, so over epochs every retain row is used, and padded into tensors.
Rows and their encoding are moxkit.text's, shared with evaluation.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from moxkit.text import IGNORE, Example


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
