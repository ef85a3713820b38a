"""Batches of a forget set and a retain set together, for unlearning trainers.

A training step of NPO+RT, NPO+KL or GA+RT needs forget examples *and* retain examples. The pieces:

* :class:`ForgetRetainDataset`: map-style, one item per forget example. Indexed by a pair
  ``(forget_index, retain_index)`` it returns ``{"forget": forget[i], "retain": retain[j]}`` (the two
  tokenized groups); indexed by an ``int`` it pairs forget example i with retain position i.
* :class:`ForgetRetainSampler`: the training order. Each epoch visits the forget set once in a seeded
  random order and pairs the k-th forget example of epoch e with the (e·F + k)-th element of a *retain
  stream*: seeded random permutations of the retain set laid end to end. So every retain example is
  used equally often however the two sizes compare (a 9:1 retain:forget split cycles through the whole
  retain set over 9 epochs instead of reusing the same tenth), and the pairing is a pure function of
  (seed, epoch, position): a run resumed from a checkpoint sees exactly the batches of an
  uninterrupted one, and every process of a distributed run draws the same order (each keeps its
  shard). ``set_epoch`` is called by ``transformers.Trainer`` / ``accelerate`` at each epoch.
* :class:`ForgetRetainCollator`: ``{"forget": batch, "retain": batch}``, each batch from a
  :class:`~alignkit.data.collate.GroupCollator`.

Without a retain set the same classes give ``{"forget": batch}`` batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.utils.data import Dataset, Sampler

from alignkit.data.collate import GroupCollator


@lru_cache(maxsize=64)
def _permutation(size: int, seed: int, cycle: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + cycle)
    return tuple(torch.randperm(size, generator=generator).tolist())


def retain_stream_index(position: int, num_retain: int, seed: int) -> int:
    """The retain example at ``position`` of the retain stream (seeded permutations end to end)."""
    cycle, offset = divmod(position, num_retain)
    return _permutation(num_retain, seed, cycle)[offset]


class ForgetRetainDataset(Dataset):
    """One item per forget example: ``{"forget": group}`` plus ``"retain": group`` when a retain set is given."""

    def __init__(self, forget, retain=None, *, seed: int = 0):
        if retain is not None and len(retain) == 0:
            raise ValueError("the retain set is empty")
        self.forget = forget
        self.retain = retain
        self.seed = seed

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            forget_index, retain_index = key
        else:  # sequential access (evaluation): the first epoch's retain stream
            forget_index = int(key)
            retain_index = None
            if self.retain is not None:
                retain_index = retain_stream_index(forget_index, len(self.retain), self.seed)
        item = {"forget": self.forget[int(forget_index)]}
        if self.retain is not None:
            item["retain"] = self.retain[int(retain_index)]
        return item


class ForgetRetainSampler(Sampler):
    """Yields ``(forget_index, retain_index)`` pairs; see the module docstring for the order."""

    def __init__(self, num_forget: int, num_retain: int | None, *, seed: int = 0, shuffle: bool = True):
        self.num_forget = num_forget
        self.num_retain = num_retain or None
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_forget

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * (self.epoch + 1))
            order = torch.randperm(self.num_forget, generator=generator).tolist()
        else:
            order = list(range(self.num_forget))
        start = self.epoch * self.num_forget
        for k, forget_index in enumerate(order):
            retain_index = (
                retain_stream_index(start + k, self.num_retain, self.seed) if self.num_retain is not None else None
            )
            yield forget_index, retain_index


@dataclass
class ForgetRetainCollator:
    """Collate ``{"forget": group, "retain": group}`` items into ``{"forget": batch, "retain": batch}``."""

    groups: GroupCollator

    def __call__(self, examples: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
        batch = {"forget": self.groups([ex["forget"] for ex in examples])}
        if "retain" in examples[0]:
            batch["retain"] = self.groups([ex["retain"] for ex in examples])
        return batch
