"""The training maths: optimizer, learning-rate schedule, one training epoch, evaluation.

Pure torch — no Ray, no MLflow (DESIGN.md §1) — so every piece is testable in milliseconds and
the same loop runs under Ray Train (kn_dist.worker) and bare (kn_dist.bench.ray). When a
`torch.distributed` process group exists, epoch metrics are summed over ranks so every rank
returns the global figures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kn_dist.config import OptimConfig, ScheduleConfig
from kn_dist.ema import ModelEma
from kn_dist.errors import UserError
from kn_dist.mix import BatchMixer, mix_targets

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# torch.compile settings of every compiled model in kn_dist (the worker, `kn-dist bench models --compile`,
# tests/test_compile.py). Static shapes: with automatic dynamic shapes dynamo recompiles a model's modules with
# symbolic sizes after a first shape change, and inductor failed on the Conformer that way (torch 2.14, CPU:
# "Cannot convert expression to float"); a training run has two or three batch sizes (the last, partial batch
# of train and of val), each compiled once. Recompile limit 64 instead of 8: room for those, train / eval and
# a module class shared by several models in one process (the bench), so that nothing falls back to eager.
COMPILE_CONFIG = {"automatic_dynamic_shapes": False, "recompile_limit": 64}


# ----------------------------------------------------------------------------- optimizer & schedule


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD or AdamW with weight decay on matrices/kernels only (p.ndim >= 2).

    Biases and norm scales/shifts (1-D) are not decayed, as in nanoGPT's `configure_optimizers`;
    KernelNorm has no affine parameters, so this rule needs no list of names.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_factor(step: int, cfg: ScheduleConfig, base_lr: float, epochs: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate before optimizer step `step` (0-based).

    Warm-up rises linearly to 1 over `warmup_epochs` (first step already > 0). After it:
    cosine decays to min_lr; onecycle is a cosine rise (over warmup_epochs, default 30 % of the
    run as torch's OneCycleLR pct_start) then a cosine fall to min_lr; multistep multiplies by
    gamma at each milestone epoch; constant stays at 1; linear falls in a straight line to min_lr at
    the last step (ffcv-imagenet's triangular "cyclic" schedule, the warm-up being its rise).
    """
    total = max(1, epochs * steps_per_epoch)
    floor = cfg.min_lr / base_lr
    if cfg.name == "onecycle":
        # OneCycleLR (Smith & Topin 2017) with cosine annealing; starts at lr/25 like torch's div_factor.
        up = max(1, round((cfg.warmup_epochs or 0.3 * epochs) * steps_per_epoch))
        start = 1 / 25
        if step < up:
            return start + (1 - start) * (1 - math.cos(math.pi * step / up)) / 2
        t = min(1.0, (step - up) / max(1, total - up))
        return floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if cfg.name == "cosine":
        t = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2
    if cfg.name == "linear":
        return 1 - (1 - floor) * min(1.0, (step - warm) / max(1, total - warm))
    if cfg.name == "multistep":
        epoch = step // steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR following `lr_factor`; call `.step()` after every optimizer step.

    Its state_dict holds only the step count (the lambda is rebuilt from the config), so a
    checkpoint restores the schedule exactly.
    """
    base_lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, base_lr, epochs, steps_per_epoch)
    )


def set_schedule_position(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a `build_scheduler` schedule at optimizer step `step` and set the learning rates for that step.

    Used on resume instead of the saved step count: the caller passes completed epochs x this run's steps
    per epoch, so a resume on another world size (another number of steps per epoch) keeps the
    schedule's position in epochs.
    """
    state = scheduler.state_dict()
    state["last_epoch"] = step
    scheduler.load_state_dict(state)  # keeps the lambdas (not in the state dict) and the base lrs
    groups = scheduler.optimizer.param_groups
    for group, base_lr, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base_lr * factor(step)


def build_ema(model: nn.Module, cfg: OptimConfig) -> ModelEma | None:
    """The EMA of `model` (unwrapped) when `cfg.ema_decay` is set, else None."""
    return None if cfg.ema_decay is None else ModelEma(model, cfg.ema_decay)


def build_mixer(cfg: OptimConfig, seed: int, rank: int) -> BatchMixer | None:
    """This rank's mixup / cutmix when either alpha is set, else None."""
    return BatchMixer(cfg, seed, rank) if cfg.mixup_alpha or cfg.cutmix_alpha else None


def compile_model(model: nn.Module) -> nn.Module:
    """torch.compile(model) after applying COMPILE_CONFIG to dynamo's process-wide configuration (a training
    process compiles one model; compilation happens at the first calls, so a scoped patch would not do)."""
    import torch._dynamo

    for key, value in COMPILE_CONFIG.items():
        setattr(torch._dynamo.config, key, value)
    return torch.compile(model)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse bf16 on a CUDA GPU without native bfloat16 (compute capability < 8.0: V100, T4): there cuBLAS and
    cuDNN emulate it or fail per op, so a run would be slow or crash mid-epoch. One clear sentence instead."""
    if precision != "bf16" or device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        name = torch.cuda.get_device_name(device)
        raise UserError(
            f"precision=bf16 needs a GPU with bfloat16 (compute capability 8.0+, Ampere or newer), but {name} is "
            f"sm_{major}{minor}; use precision=fp16 (loss-scaled) or fp32"
        )


def build_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 only; a disabled scaler (a no-op passthrough) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def autocast(precision: str, device: torch.device):
    """Autocast context for bf16/fp16 (bf16 works on CPU too); nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


# ----------------------------------------------------------------------------- loops


def classification_loss(outputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor, smoothing: float):
    """Cross-entropy; a tuple of logits (Conformer's CNN and transformer heads) gives the mean of their losses.

    `labels` are class indices, or (N, classes) probabilities (mixup / cutmix targets; label smoothing then
    smooths the mixed targets, which equals mixing smoothed one-hot targets as timm's Mixup does)."""
    if isinstance(outputs, tuple):
        return sum(F.cross_entropy(o.float(), labels, label_smoothing=smoothing) for o in outputs) / len(outputs)
    return F.cross_entropy(outputs.float(), labels, label_smoothing=smoothing)


def _logits(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    # Conformer predicts with the sum of its two heads (what it returns in eval mode).
    return sum(outputs) if isinstance(outputs, tuple) else outputs


def _global_sums(*values: float, device: torch.device) -> list[float]:
    """Sum scalars over ranks when a process group exists (one all-reduce for all of them)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    # gloo cannot reduce on CUDA tensors created elsewhere; use the group's natural device.
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=where)
    dist.all_reduce(t)
    return t.tolist()


def train_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    *,
    device: torch.device,
    precision: str = "fp32",
    label_smoothing: float = 0.0,
    grad_clip: float | None = None,
    channels_last: bool = False,
    mixer: BatchMixer | None = None,
    ema: ModelEma | None = None,
    accumulation_steps: int = 1,
) -> dict[str, float]:
    """One pass over `loader`; returns global mean loss, top-1 (fraction), images and seconds.

    `mixer` mixes each batch (mixup / cutmix, drawn from the loader's epoch and the batch's index in it; top-1
    still counts each image's own label); `ema` is updated after every optimizer step. With
    `accumulation_steps` A > 1, one optimizer step follows every A batches, on the mean of their losses
    (kn_dist.data.global_batch); a DDP model all-reduces on the last of the A backward passes only.
    """
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    if mixer is not None:  # the loader's 0-based epoch counter (kn_dist.data's loaders), where it has one
        mixer.epoch = getattr(loader, "next_epoch", mixer.epoch)
    start = time.perf_counter()
    no_sync = getattr(model, "no_sync", None)  # DDP (also under torch.compile)
    for step, (images, labels) in enumerate(loader):
        mix = None
        if mixer is not None:
            images, mix = mixer(images, step)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        stepping = (step + 1) % accumulation_steps == 0
        if step % accumulation_steps == 0:
            optimizer.zero_grad(set_to_none=True)
        with nullcontext() if stepping or no_sync is None else no_sync():
            with autocast(precision, device):
                outputs = model(images)
                targets = labels
                if mix is not None and mix.kind != "none":
                    classes = (outputs[0] if isinstance(outputs, tuple) else outputs).shape[-1]
                    targets = mix_targets(labels, mix, classes)
                loss = classification_loss(outputs, targets, label_smoothing)
            scaler.scale(loss / accumulation_steps).backward()
        if stepping:
            if grad_clip is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update()
        # Accumulate on device: no host sync per step.
        n = labels.shape[0]
        loss_sum += loss.detach().double() * n
        correct += (_logits(outputs).detach().argmax(1) == labels).sum()
        seen += n
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    loss_total, correct_total, seen_total = _global_sums(loss_sum.item(), correct.item(), seen, device=device)
    return {
        "loss": loss_total / max(1, seen_total),
        "top1": correct_total / max(1, seen_total),
        "images": seen_total,
        "seconds": seconds,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    examples: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    tta_flip: bool = False,
) -> dict[str, float]:
    """Global mean cross-entropy and top-1 over `loader` (summed over ranks).

    Each rank must see a disjoint shard of the validation set for the figures to count every
    sample once; kn_dist.data's validation loader is built that way. `examples`, if given, receives this
    rank's (correct, label) per batch on the CPU: a final's per-example test record. `tta_flip`: the logits
    are the mean of the image's and its horizontal mirror's (ffcv-imagenet's test-time augmentation).
    """
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for images, labels in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(precision, device):
            logits = _logits(model(images))
            if tta_flip:
                logits = (logits + _logits(model(images.flip(3)))) / 2
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        right = logits.argmax(1) == labels
        correct += right.sum()
        seen += labels.shape[0]
        if examples is not None:
            examples.append((right.to("cpu", torch.int8), labels.to("cpu", torch.int16)))
    loss_total, correct_total, seen_total = _global_sums(loss_sum.item(), correct.item(), seen, device=device)
    return {"loss": loss_total / max(1, seen_total), "top1": correct_total / max(1, seen_total), "images": seen_total}
