"""The order of training samples: a pure function of (seed, epoch, dropped items), resumable
at any micro-batch, and never exhausted while a readable item remains.

`EpochBatches` yields this rank's micro-batches (lists of dataset indices). Round 0 of an epoch
is `DistributedSampler(shuffle=True, drop_last=True)`'s order with the dropped (unreadable)
items removed; when an epoch needs more batches than round 0 holds (items were dropped, or a
batch came back empty), further rounds follow, each a fresh permutation of the remaining
items. Because the batches depend only on (seed, epoch, dropped set at the epoch's start), a
run resumed with `start=` the number of batches consumed sees exactly the batches the
uninterrupted run saw; the engine checkpoints that number and the dropped set.

`IndexedDataset` + `collate_with_failures` tell the engine which requested indices came back
unreadable (None), even from DataLoader worker processes, so it can drop them.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def _round_seed(seed: int, epoch: int, round_index: int) -> int:
    if round_index == 0:
        return seed + epoch  # DistributedSampler's seed: round 0 keeps its order
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, round_index]).generate_state(1)[0])


class EpochBatches(Sampler[List[int]]):
    """This rank's micro-batches of one epoch, from micro-batch `start` on (an endless stream:
    the caller takes as many as its updates need)."""

    def __init__(self, size: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 exclude: Iterable[int] = (), start: int = 0):
        self.size, self.batch_size = int(size), int(batch_size)
        self.seed, self.epoch = int(seed), int(epoch)
        self.rank, self.world_size = int(rank), int(world_size)
        self.exclude = frozenset(int(i) for i in exclude)
        self.start = int(start)

    def round_batches(self, round_index: int) -> List[List[int]]:
        """The micro-batches of one round (round 0: the epoch's own permutation)."""
        g = torch.Generator()
        g.manual_seed(_round_seed(self.seed, self.epoch, round_index))
        order = [i for i in torch.randperm(self.size, generator=g).tolist() if i not in self.exclude]
        per_rank = len(order) // self.world_size
        mine = order[self.rank:per_rank * self.world_size:self.world_size]
        batches = [mine[b * self.batch_size:(b + 1) * self.batch_size] for b in range(len(mine) // self.batch_size)]
        if not batches and round_index > 0:
            # fewer readable items than one global batch: train on smaller batches rather than stop
            mine = mine or order[self.rank::self.world_size]
            batches = [mine] if mine else []
        return batches

    def __iter__(self) -> Iterator[List[int]]:
        if len(self.exclude) >= self.size:
            return
        position = 0
        for r in itertools.count():
            batches = self.round_batches(r)
            if not batches and r > 0:
                return  # this rank has no item left to read
            for batch in batches:
                if position >= self.start:
                    yield batch
                position += 1


class IndexedDataset(Dataset):
    """(index, sample or None, why it was unreadable) for each requested index."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        reason = None
        if sample is None:
            reason = _failure_reason(self.dataset, index)
        return index, sample, reason


def _failure_reason(dataset, index: int) -> str:
    """The media policy's reason for an unreadable item (TrainDataset.failures is keyed by path)."""
    failures = getattr(dataset, "failures", None) or {}
    items = getattr(dataset, "items", None)
    pairs = getattr(dataset, "_pairs", None)
    try:
        item = items[pairs[index][0] if pairs is not None else index] if items is not None else None
    except (IndexError, TypeError):
        item = None
    path = getattr(item, "media", None)
    if path is not None:
        return f"{path}: {failures.get(path, 'unreadable')}"
    return f"item {index}: unreadable"


class collate_with_failures:  # noqa: N801 - used like a function; a class so DataLoader workers can pickle it
    """Wrap a collate function: the batch of the readable samples (None if there is none) and
    `unreadable` {index: reason} of the requested ones that were not."""

    def __init__(self, collate: Callable[[List[Any]], Optional[Dict[str, Any]]]):
        self.collate = collate

    def __call__(self, triples) -> Dict[str, Any]:
        samples = [s for _, s, _ in triples]
        unreadable = {int(i): why for i, s, why in triples if s is None}
        return {"batch": self.collate(samples) if len(unreadable) < len(samples) else None,
                "unreadable": unreadable}
