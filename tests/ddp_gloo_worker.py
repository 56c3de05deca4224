"""One rank of tests/test_ddp_gloo.py (a module of its own: torch.multiprocessing's spawn imports it by name).

Every KernelNorm family's small model (tests/kn_families.py), channels_last, wrapped in DDP over gloo and
compiled with the worker's settings (engine.COMPILE_CONFIG; dynamo with its DDP optimizer, backend "eager":
graph breaks, recompiles and DDP's bucketing are dynamo's, the arithmetic is eager's, so gradients can be
compared exactly); one training step on this rank's half of a fixed batch with dropout on (dense draws, the
seed 100 + rank). Rank 0 saves, per family, the averaged gradients, the warnings raised and dynamo's graph
and graph-break counts to `out_dir`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

BATCH = 4


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed global batch: 4 images (channels_last) and labels."""
    from kn_families import SIZE

    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return x.contiguous(memory_format=torch.channels_last), torch.arange(BATCH) % 10


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, tuple):  # Conformer: the mean of its two heads' losses, as engine.classification_loss
        return sum(F.cross_entropy(o, y) for o in out) / len(out)
    return F.cross_entropy(out, y)


def run(rank: int, world: int, store: str, out_dir: str) -> None:
    """torch.multiprocessing.spawn target: one rank."""
    from kn_families import FAMILIES, build
    from torch._dynamo.utils import counters

    from kn_dist import engine
    from kn_dist.layers.dropout_draws import dense_draws

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    x, y = batch()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for label in FAMILIES:
        torch.manual_seed(0)
        model = build(label).to(memory_format=torch.channels_last)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        torch._dynamo.reset()
        counters.clear()
        with warnings.catch_warnings(record=True) as caught, torch._dynamo.config.patch(**engine.COMPILE_CONFIG):
            warnings.simplefilter("always")
            compiled = torch.compile(ddp, backend="eager")
            torch.manual_seed(100 + rank)
            with dense_draws():
                loss_of(compiled, x[shard], y[shard]).backward()
        if rank == 0:
            record = {
                "grads": {name: p.grad.detach().clone() for name, p in model.named_parameters()},
                "warnings": [str(w.message) for w in caught],
                "graph_breaks": sum(counters["graph_break"].values()),
                "unique_graphs": counters["stats"]["unique_graphs"],
            }
            torch.save(record, Path(out_dir) / f"{label.replace('/', '_')}.pt")
        dist.barrier()
    dist.destroy_process_group()
