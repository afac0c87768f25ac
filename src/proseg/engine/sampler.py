"""A DistributedSampler whose batches are a pure function of (seed, epoch, world size) and can start mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from proseg.errors import ConfigError


class GlobalBatchSampler(DistributedSampler):
    """Shuffles the training part once per epoch and deals each **global** batch out to the ranks.

    Epoch ``e``'s order is ``randperm(n)`` from a generator seeded with ``seed`` and ``e`` (the same on every
    rank and for every world size). Global batch ``i`` is ``perm[i*B:(i+1)*B]``; rank ``r`` of ``W`` takes the
    ``r``-th contiguous slice of ``B / W`` of it. So a W-process run sees exactly the batches of a 1-process run
    at the same global batch ``B``, which is what makes their loss curves comparable. The incomplete last
    batch is dropped (every step has the same size on every rank).

    ``set_epoch(e, start_batch=k)`` skips the first ``k`` global batches: a resumed run continues at the batch
    after the last completed step without loading the skipped samples.
    """

    def __init__(self, dataset: Dataset, global_batch: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        if global_batch % num_replicas != 0:
            raise ConfigError(f"train.batch_size={global_batch} is not divisible by the {num_replicas} processes "
                              f"(the global batch is split evenly over the ranks)")
        self.global_batch = global_batch
        self.local_batch = global_batch // num_replicas
        self.n = len(dataset)  # type: ignore[arg-type]
        self.batches_per_epoch = self.n // global_batch
        if self.batches_per_epoch == 0:
            raise ConfigError(f"train.batch_size={global_batch}: the training part has only {self.n} samples, "
                              f"fewer than one batch (lower train.batch_size)")
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self.start_batch = start_batch

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[int]:
        perm = self._order()[: self.batches_per_epoch * self.global_batch]
        per_batch = perm.view(self.batches_per_epoch, self.num_replicas, self.local_batch)
        mine = per_batch[self.start_batch :, self.rank].reshape(-1)
        return iter(mine.tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.local_batch
