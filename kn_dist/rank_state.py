"""Per-rank state of a training run: seeding, the RNG states a checkpoint holds, and small collectives.

Pure torch (no Ray): kn_dist.worker saves every rank's RNG states in its checkpoints so a resumed run
draws the same dropout masks it would have drawn, and agrees on rank 0's decisions.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def broadcast_flag(flag: bool, world: int) -> bool:
    """Rank 0's `flag` on every rank (a decision that changes which collectives run must be the same)."""
    if world == 1:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def gather_objects(obj: Any, world: int) -> list[Any]:
    """Every rank's `obj` on every rank (RNG states must be saved for all ranks, not only rank 0)."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out
