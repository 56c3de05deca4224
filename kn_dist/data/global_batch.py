"""A global batch that stays the same on any number of workers (`scaling.global_batch_size`).

DDP averages the gradients of the workers' batches, so one optimizer step of W workers with batch B
each follows the mean loss over W·B samples. To keep that step when a run continues on fewer workers
(a lost node: DESIGN.md §9), each worker accumulates the gradients of A micro-batches before the step:

    global batch G = data.batch_size (per worker, B) x world size (W) x accumulation steps (A)

B stays fixed, so BatchNorm statistics and memory per worker do not change with W; A = G / (B·W) must
be an integer (`accumulation_steps`). Decided here rather than a larger per-worker batch: a larger B
would change what BatchNorm normalises over and could exceed the GPU's memory.

Which samples form a step must not depend on W either. `GlobalOrder` permutes the N training indices
with (seed, epoch), keeps the first floor(N / G)·G (a global drop_last), and gives rank r of W the
strided share perm[r::W]. Step k then holds exactly perm[k·G : (k+1)·G] for every (W, A) with
W·A·B = G: rank r's micro-batch j of step k is {perm[W·i + r] : (k·A + j)·B <= i < (k·A + j + 1)·B}, and
the union over r and j is that contiguous block. With a batch-independent model (KernelNorm, no
dropout) one worker accumulating two micro-batches and two DDP workers take the same steps up to
floating-point summation order (tests/test_imagenet_cluster.py).
"""

from __future__ import annotations

import numpy as np

from kn_dist.errors import UserError

_U64 = (1 << 64) - 1


def accumulation_steps(global_batch: int | None, batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step on `world_size` workers (1 without a fixed global batch)."""
    if global_batch is None:
        return 1
    per_round = batch_size * world_size
    if global_batch % per_round:
        raise UserError(
            f"scaling.global_batch_size {global_batch} is not a multiple of data.batch_size {batch_size} x "
            f"{world_size} workers ({per_round}); use a global batch divisible by it, or a world size in "
            f"{valid_world_sizes(global_batch, batch_size, 1, max(world_size, 1))}"
        )
    return global_batch // per_round


def valid_world_sizes(global_batch: int, batch_size: int, low: int, high: int) -> list[int]:
    """World sizes in [low, high] on which `global_batch` splits into whole micro-batches of `batch_size`."""
    return [w for w in range(low, high + 1) if global_batch % (batch_size * w) == 0]


def check_global_batch(global_batch: int, num_samples: int) -> None:
    """UserError when the training split cannot fill one global batch (0 steps per epoch)."""
    if num_samples < global_batch:
        raise UserError(
            f"scaling.global_batch_size {global_batch} exceeds the {num_samples} training samples, which gives 0 "
            f"steps per epoch; use a global batch of at most {num_samples}"
        )


class GlobalOrder:
    """Rank `rank` of `world_size`'s sample indices for an epoch: the same global permutation for every
    world size, cut to whole global batches, shared out strided (see the module doc)."""

    def __init__(self, num_samples: int, seed: int, global_batch: int, rank: int, world_size: int):
        check_global_batch(global_batch, num_samples)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.num_samples, self.seed, self.global_batch = num_samples, seed & _U64, global_batch
        self.rank, self.world_size = rank, world_size

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's global order of all samples (NumPy's PCG64 seeded with (seed, epoch))."""
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_samples)

    def __call__(self, epoch: int) -> np.ndarray:
        keep = (self.num_samples // self.global_batch) * self.global_batch
        return self.permutation(epoch)[:keep][self.rank :: self.world_size].astype(np.uint64)
