"""A global batch kept on any world size (scaling.global_batch_size), and test-time flip.

References: the step of plain SGD on the whole global batch in one backward (what DDP promises for a
batch-independent model), computed here by hand; the partition property stated in
kn_dist.data.global_batch's module doc, checked by enumeration; the mean of the logits of an image and its
mirror, computed by hand.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kn_dist import config, engine
from kn_dist.config import OptimConfig, ScheduleConfig
from kn_dist.data.global_batch import GlobalOrder, accumulation_steps, valid_world_sizes
from kn_dist.errors import UserError


@pytest.mark.parametrize("n,global_batch,per_worker", [(103, 12, 2), (64, 16, 4)])
def test_every_world_size_takes_the_same_steps(n, global_batch, per_worker):
    steps = n // global_batch
    for epoch in (0, 3):
        reference = None
        for world in valid_world_sizes(global_batch, per_worker, 1, global_batch // per_worker):
            accum = accumulation_steps(global_batch, per_worker, world)
            shares = [GlobalOrder(n, 11, global_batch, r, world)(epoch) for r in range(world)]
            assert all(len(s) == steps * accum * per_worker for s in shares), "each rank: whole steps only"
            # step k = the union over ranks of their micro-batches k*accum .. k*accum + accum - 1
            chunk = accum * per_worker
            by_step = [sorted(int(i) for s in shares for i in s[k * chunk : (k + 1) * chunk]) for k in range(steps)]
            flat = [i for step in by_step for i in step]
            assert len(set(flat)) == len(flat) == steps * global_batch, "no sample twice in an epoch"
            reference = reference or by_step
            assert by_step == reference, f"world {world}: other samples per step"
    first, second = GlobalOrder(n, 11, global_batch, 0, 1)(0), GlobalOrder(n, 11, global_batch, 0, 1)(1)
    assert not np.array_equal(first, second), "reshuffled every epoch"
    with pytest.raises(UserError, match="not a multiple of data.batch_size 4 x 3 workers"):
        accumulation_steps(16, 4, 3)


class _Net(nn.Module):
    """Conv -> ReLU -> pool -> linear: no norm, so each sample's gradient does not depend on the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def _train(model: nn.Module, batches, accumulation: int) -> dict[str, torch.Tensor]:
    optimizer = engine.build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.0))
    scheduler = engine.build_scheduler(optimizer, ScheduleConfig(name="constant"), 1, 4)
    scaler = engine.build_scaler("fp32", torch.device("cpu"))
    engine.train_epoch(
        model, batches, optimizer, scheduler, scaler, device=torch.device("cpu"), accumulation_steps=accumulation
    )
    assert scheduler.last_epoch == len(batches) // accumulation, "one schedule step per optimizer step"
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_accumulated_micro_batches_take_the_global_batch_step(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 6, 6), torch.randint(0, 5, (32,))
    start = _Net()
    # Reference: SGD (momentum 0.9) by hand on the mean loss of each 16-sample global batch.
    ref = copy.deepcopy(start)
    velocity = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for k in range(2):
        ref.zero_grad()
        F.cross_entropy(ref(x[16 * k : 16 * (k + 1)]), y[16 * k : 16 * (k + 1)]).backward()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                velocity[n] = 0.9 * velocity[n] + p.grad
                p -= 0.1 * velocity[n]
    micro = [(x[8 * i : 8 * (i + 1)], y[8 * i : 8 * (i + 1)]) for i in range(4)]
    plain = _train(copy.deepcopy(start), micro, accumulation=2)
    # The same through DDP (a one-process gloo group), whose gradients are all-reduced once per optimizer step:
    # the first micro-batch of a step runs under no_sync (counted by a communication hook).
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, reductions = nn.parallel.DistributedDataParallel(copy.deepcopy(start)), []
        model.register_comm_hook(None, lambda state, bucket: reductions.append(1) or allreduce_hook(state, bucket))
        ddp = _train(model, micro, accumulation=2)
    finally:
        dist.destroy_process_group()
    assert len(reductions) == 2, f"{len(reductions)} all-reduces for 2 optimizer steps (one bucket each)"
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(plain[name], value, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(plain["fc.weight"], start.state_dict()["fc.weight"])


def test_tta_flip_scores_the_mean_logits_of_image_and_mirror():
    torch.manual_seed(1)
    model, x, y = _Net().eval(), torch.randn(10, 3, 6, 6), torch.randint(0, 5, (10,))
    with torch.no_grad():
        logits = (model(x) + model(torch.flip(x, dims=[3]))) / 2
    got = engine.evaluate(model, [(x[:6], y[:6]), (x[6:], y[6:])], device=torch.device("cpu"), tta_flip=True)
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert got["top1"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    plain = engine.evaluate(model, [(x, y)], device=torch.device("cpu"))
    assert plain["loss"] != pytest.approx(got["loss"], rel=1e-6), "the flip changes the scores of this model"


BASE = {"data": {"dataset": "imagefolder", "batch_size": 8}, "scaling": {"num_workers": 4}}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"scaling": {"num_workers": 4, "global_batch_size": 48}}, "multiple of data.batch_size 8 x 4 workers"),
        ({"scaling": {"num_workers": 4, "min_workers": 2}}, "min_workers .* needs scaling.global_batch_size"),
        ({"scaling": {"num_workers": 4, "min_workers": 3, "global_batch_size": 64}}, "8 x 3 workers"),
        ({"scaling": {"num_workers": 2, "min_workers": 4, "global_batch_size": 64}}, "exceeds scaling.num_workers"),
        ({"data": {"dataset": "cifar10", "progressive": {"min_res": 16, "max_res": 32}}}, "imagefolder crops"),
        ({"data": {"dataset": "imagefolder", "progressive": {"min_res": 32, "max_res": 16}}}, "min_res <= max_res"),
        (
            {
                "data": {"dataset": "imagefolder", "batch_size": 8, "order": "quasi_random"},
                "scaling": {"global_batch_size": 64},
            },
            "orders samples itself",
        ),
    ],
)
def test_bad_global_batch_and_resizing_settings_name_the_keys(change, message):
    raw = {**BASE, **change}
    with pytest.raises(UserError, match=message):
        config.from_dict(raw)


def test_global_batch_and_lr_scaling_are_logged_as_derived_params():
    from kn_dist.tracking import derived_params

    fixed = config.from_dict({"scaling": {"num_workers": 2, "global_batch_size": 1024}, "data": {"batch_size": 128}})
    assert derived_params(fixed)["derived.global_batch_size"] == "1024"  # not 128 x 2: accumulation makes up the rest
    assert derived_params(fixed)["derived.lr_per_256"] == "0.025"  # optim.lr 0.1 for 1024 images
    loose = config.from_dict({"scaling": {"num_workers": 8}, "data": {"batch_size": 32}, "optim": {"lr": 0.1}})
    assert (
        derived_params(loose)["derived.global_batch_size"] == "256"
        and derived_params(loose)["derived.lr_per_256"] == "0.1"
    )
