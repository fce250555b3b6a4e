"""Global-batch sampler: deterministic in (seed, epoch, step), each data-parallel rank a disjoint slice.

Epoch e visits `permutation(e)` (a seeded permutation of all sample indices, or 0..n-1 without shuffling) in
global batches of g = per_device_batch_size × dp_world_size; step s is positions [s·g, (s+1)·g) and rank r takes
the r-th contiguous block of per_device_batch_size of it. The last incomplete global batch of an epoch is dropped
(n mod g samples, different ones each epoch when shuffling) so that every rank always gets full, equally
shaped batches.
"""
from __future__ import annotations

import numpy as np


class GlobalBatchSampler:
    def __init__(self, num_samples: int, per_device_batch_size: int, dp_world_size: int = 1, dp_rank: int = 0,
                 seed: int = 0, shuffle: bool = True):
        if per_device_batch_size < 1 or dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"bad batch layout: per_device_batch_size={per_device_batch_size}, "
                             f"dp_world_size={dp_world_size}, dp_rank={dp_rank}")
        self.num_samples = num_samples
        self.per_device_batch_size = per_device_batch_size
        self.dp_world_size = dp_world_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.shuffle = shuffle
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch "
                             f"({self.global_batch_size} = {per_device_batch_size} per device × {dp_world_size})")
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def global_batch_size(self) -> int:
        return self.per_device_batch_size * self.dp_world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_samples) if self.shuffle
                     else np.arange(self.num_samples))
            self._cached = (epoch, order)
        return self._cached[1]

    def global_positions(self, step: int) -> range:
        """Positions in the epoch's permutation of global batch `step`."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside the epoch (0..{self.steps_per_epoch - 1})")
        return range(step * self.global_batch_size, (step + 1) * self.global_batch_size)

    def local_slots(self) -> range:
        """Which slots of a global batch belong to this rank."""
        b = self.per_device_batch_size
        return range(self.dp_rank * b, (self.dp_rank + 1) * b)
