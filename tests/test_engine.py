"""engine.py against independent references: torch's own schedulers, a hand-written SGD loop, and a
real 2-process gloo group for DDP averaging (issue 6: "2 workers x b == 1 worker x 2b")."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from kn_dist import engine
from kn_dist.config import OptimConfig, ScheduleConfig

CPU = torch.device("cpu")


def _lrs(scheduler_factory, steps: int, lr: float = 0.1) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = scheduler_factory(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_matches_torch():
    epochs, spe = 4, 5
    ours = _lrs(lambda o: engine.build_scheduler(o, ScheduleConfig(name="cosine", min_lr=0.001), epochs, spe), 20)
    ref = _lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=0.001), 20)
    assert ours == pytest.approx(ref, abs=1e-9)


def test_multistep_matches_torch():
    cfg = ScheduleConfig(name="multistep", milestones=[2, 3], gamma=0.2)
    ours = _lrs(lambda o: engine.build_scheduler(o, cfg, 4, 5), 20)
    ref = _lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[10, 15], gamma=0.2), 20)
    assert ours == pytest.approx(ref, abs=1e-9)


def test_warmup_then_cosine_and_onecycle_shape():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=1)
    lrs = _lrs(lambda o: engine.build_scheduler(o, cfg, 4, 5), 20)
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])  # linear, never a zero step
    assert lrs[5] == pytest.approx(0.1) and lrs[-1] < 0.01 and lrs == lrs[:5] + sorted(lrs[5:], reverse=True)
    one = _lrs(lambda o: engine.build_scheduler(o, ScheduleConfig(name="onecycle"), 10, 10), 100)
    assert one[0] == pytest.approx(0.1 / 25)  # torch OneCycleLR's div_factor
    assert max(one) == pytest.approx(0.1) and one.index(max(one)) == 30  # pct_start 0.3
    assert one[-1] < 1e-3
    const = _lrs(lambda o: engine.build_scheduler(o, ScheduleConfig(name="constant"), 2, 3), 6)
    assert const == [0.1] * 6


def test_weight_decay_only_on_matrices():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    opt = engine.build_optimizer(model, OptimConfig(name="adamw", lr=0.1, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only decoupled weight decay moves a parameter
    opt.step()
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            assert torch.allclose(p, before[name] * (1 - 0.1 * 0.5)), name
        else:
            assert torch.equal(p, before[name]), name  # biases, BN scale/shift: not decayed


def _batches(n_batches: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, 5, (batch,), generator=g)) for _ in range(n_batches)
    ]


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
    )


def test_train_epoch_equals_hand_written_sgd_loop():
    data = _batches(4, 16)
    ocfg = OptimConfig(lr=0.05, momentum=0.0, weight_decay=0.0, label_smoothing=0.1, grad_clip=0.5)
    model = _small_model()
    opt = engine.build_optimizer(model, ocfg)
    sched = engine.build_scheduler(opt, ScheduleConfig(name="constant"), 1, len(data))
    stats = engine.train_epoch(
        model, data, opt, sched, engine.build_scaler("fp32", CPU), device=CPU, label_smoothing=0.1, grad_clip=0.5
    )

    ref = _small_model()
    losses, correct = [], 0
    for x, y in data:
        out = ref(x)
        loss = F.cross_entropy(out, y, label_smoothing=0.1)
        ref.zero_grad()
        loss.backward()
        grads = [p.grad for p in ref.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        scale = min(1.0, 0.5 / (float(norm) + 1e-6))
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.05 * scale * p.grad
        losses.append(loss.item())
        correct += (out.argmax(1) == y).sum().item()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    assert stats["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert stats["top1"] == correct / 64 and stats["images"] == 64


def test_bf16_autocast_runs_on_cpu():
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 8 * 8, 5)

        def forward(self, x):
            out = self.fc(x.flatten(1))
            seen.append(out.dtype)
            return out

    model = Probe()
    opt = engine.build_optimizer(model, OptimConfig(lr=0.01))
    sched = engine.build_scheduler(opt, ScheduleConfig(name="constant"), 1, 2)
    stats = engine.train_epoch(
        model, _batches(2, 8), opt, sched, engine.build_scaler("bf16", CPU), device=CPU, precision="bf16"
    )
    assert seen == [torch.bfloat16, torch.bfloat16] and torch.isfinite(torch.tensor(stats["loss"]))
    assert model.fc.weight.dtype == torch.float32  # master weights stay fp32


def test_tuple_outputs_average_the_losses():
    """Conformer-style: two heads in train mode (loss = mean of CEs), their sum in eval mode."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return (self.a(x), self.b(x)) if self.training else self.a(x) + self.b(x)

    torch.manual_seed(0)
    model = TwoHeads()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    expected = (F.cross_entropy(model.a(x), y) + F.cross_entropy(model.b(x), y)) / 2
    assert engine.classification_loss(model(x), y, 0.0).item() == pytest.approx(expected.item())
    ev = engine.evaluate(model, [(x, y)], device=CPU)
    logits = model.a(x) + model.b(x)
    assert ev["top1"] == (logits.argmax(1) == y).float().mean().item()
    assert ev["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


def test_mixed_batches_and_ema_equal_torchvision_mixup_cutmix_and_averaged_model(monkeypatch):
    """train_epoch with mixup / cutmix and an EMA against a hand-written loop: torchvision's v2.MixUp / v2.CutMix
    given each batch's draws (kn_dist.mix.draw), soft-target cross-entropy with label smoothing, and
    AveragedModel(get_ema_multi_avg_fn) updated after every step."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from torchvision.transforms import v2

    from kn_dist.mix import draw

    class Fixed:
        def __init__(self, value):
            self.value = value

        def sample(self, shape=()):
            return torch.tensor(self.value, dtype=torch.float64)

    data = _batches(6, 16, seed=3)
    ocfg = OptimConfig(lr=0.05, momentum=0.0, weight_decay=0.0, mixup_alpha=0.8, cutmix_alpha=1.0, ema_decay=0.8)
    model = _small_model()
    opt = engine.build_optimizer(model, ocfg)
    sched = engine.build_scheduler(opt, ScheduleConfig(name="constant"), 1, len(data))
    mixer, ema = engine.build_mixer(ocfg, seed=5, rank=0), engine.build_ema(model, ocfg)
    mixer.epoch = 2
    scaler = engine.build_scaler("fp32", CPU)
    engine.train_epoch(model, data, opt, sched, scaler, device=CPU, label_smoothing=0.1, mixer=mixer, ema=ema)

    ref = _small_model()
    averaged = AveragedModel(ref, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    averaged.update_parameters(ref)
    kinds = set()
    for step, (x, y) in enumerate(data):
        mix = draw(ocfg, 5, 2, step, 0, x.shape[-2], x.shape[-1])
        kinds.add(mix.kind)
        targets = F.one_hot(y, 5).float()
        if mix.kind != "none":
            transform = v2.MixUp(alpha=0.8, num_classes=5) if mix.kind == "mixup" else v2.CutMix(num_classes=5)
            transform._dist = Fixed(mix.beta)
            centre = iter(mix.centre or ())
            with monkeypatch.context() as patch:  # torchvision draws the box centre with randint(W), randint(H)
                patch.setattr(torch, "randint", lambda *a, _c=centre, **k: torch.tensor([next(_c)]))
                x, targets = transform(x, y)
        loss = F.cross_entropy(ref(x), targets, label_smoothing=0.1)
        ref.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.05 * p.grad
        averaged.update_parameters(ref)
    assert kinds >= {"mixup", "cutmix"}
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    for p, q in zip(ema.module.parameters(), averaged.module.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_soft_target_loss_with_smoothing_is_the_mixup_criterion():
    # Lee et al.'s / Zhang et al.'s mixup criterion: lam * CE(out, y_a) + (1 - lam) * CE(out, y_b), each smoothed.
    from kn_dist.mix import Mix, mix_targets

    torch.manual_seed(0)
    out, y = torch.randn(6, 7), torch.randint(0, 7, (6,))
    lam = 0.35
    targets = mix_targets(y, Mix("mixup", lam), 7)
    want = lam * F.cross_entropy(out, y, label_smoothing=0.1) + (1 - lam) * F.cross_entropy(
        out, y.roll(1, 0), label_smoothing=0.1
    )
    assert engine.classification_loss(out, targets, 0.1).item() == pytest.approx(want.item(), rel=1e-6)


# ----------------------------------------------------------------------------- DDP over gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, x, y, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_small_model())
        opt = engine.build_optimizer(model.module, OptimConfig(lr=1.0, momentum=0.0, weight_decay=0.0))
        sched = engine.build_scheduler(opt, ScheduleConfig(name="constant"), 1, 1)
        b = x.shape[0] // world
        shard = [(x[rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b])]
        val = engine.evaluate(model.module, [(x[rank::world], y[rank::world])], device=CPU)
        before = [p.detach().clone() for p in model.module.parameters()]
        stats = engine.train_epoch(model, shard, opt, sched, engine.build_scaler("fp32", CPU), device=CPU)
        # lr 1, plain SGD: the step is minus the gradient DDP averaged over ranks.
        grads = [b0 - p.detach() for b0, p in zip(before, model.module.parameters(), strict=True)]
        if rank == 0:  # numpy, not tensors: torch would share them through this process's fds
            queue.put(([g.numpy() for g in grads], stats, val))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_workers_equal_one_worker_with_double_batch():
    x, y = _batches(1, 32, seed=1)[0]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_rank, args=(r, 2, port, x, y, queue)) for r in range(2)]
    for p in procs:
        p.start()
    grads, stats, val = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    ref = _small_model()
    loss = F.cross_entropy(ref(x), y)
    loss.backward()
    for g, p in zip(grads, ref.parameters(), strict=True):
        assert torch.allclose(torch.from_numpy(g), p.grad, atol=1e-6, rtol=1e-5)
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-6)  # epoch metrics are global, not rank 0's
    assert stats["images"] == 32
    with torch.no_grad():  # disjoint strided val shards summed over ranks count each sample once
        logits = _small_model()(x)
    assert val["images"] == 32
    assert val["top1"] == (logits.argmax(1) == y).float().mean().item()
