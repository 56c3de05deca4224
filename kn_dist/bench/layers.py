"""`kn-dist bench layers`: KNConv2d vs. the official-style KernelNorm conv vs. Conv2d + BatchNorm2d.

For each shape of issue 2's table, forward+backward (training mode, dropout on the statistics) is
timed and its peak memory measured for:
  - kn:        our KNConv2d (pooled statistics, custom autograd function),
  - official:  the official code's method, written here as the reference: zero-pad, conv, dropout on
               the padded input, unfold every (C, kh, kw) unit, var_mean per unit, then
               (conv - mu * sum(W)) / sqrt(var + eps) + b, all through autograd,
  - conv_bn:   nn.Conv2d followed by nn.BatchNorm2d (training mode),
  - conv:      the nn.Conv2d alone (with bias), the convolution every KNConv2d contains: official / conv
               bounds speedup_vs_official from above for any layer that runs this convolution (reported as
               `speedup_bound_vs_official`, no target),
  - pooled:    the same pooled maths as kn but through plain autograd (shows what the custom
               function buys; not part of the targets).

Method. Batch 32, fp32, on the GPU where there is one (cuDNN's conv + BN; `kn-dist bench gpu` runs it there),
else the CPU with torch.set_num_threads(2). Time: the implementations run in turn
(interleaved) `repeats` times after a warm-up, each run = forward + backward with a fixed output
gradient, gradients reset to None first; we report the median in ms. Peak memory: one extra run per
implementation under torch.profiler with profile_memory=True; the allocator events (+bytes on
allocation, -bytes on free, in time order) are summed and the maximum of the running total is the
peak of torch-allocated bytes live at once during forward+backward, beyond what existed before
(input, weights, output gradient). This counts tensors, not the C allocator's caches, so it is
repeatable and independent of malloc's reuse; it does not see oneDNN's private scratch buffers.

Targets (issue 2, 3x3 stride 1 cases): kn >= 6x faster and >= 4x less peak memory than official;
kn <= 1.25x the time and <= 1.5x the peak memory of conv_bn. The machine is shared, so every
figure is a median of interleaved repeats; ratios of medians are what the targets are checked on.
Where speedup_bound_vs_official is below 6, no layer that computes this convolution with torch's own
kernels can meet the first target: its time is at least the convolution's.
"""

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from kn_dist.bench import layer_ops
from kn_dist.layers.kernel_norm import KNConv2d, _kn_conv2d_autograd
from kn_dist.runtime import keep_freed_cpu_memory

BATCH = 32
DROPOUT_P = 0.05
THREADS = 2

# (name, in/out channels, H = W, kernel, stride, padding, groups, targets apply)
SHAPES = [
    ("conv3x3_c64_32x32", 64, 32, 3, 1, 1, 1, True),
    ("conv3x3_c128_16x16", 128, 16, 3, 1, 1, 1, True),
    ("conv3x3_c256_8x8", 256, 8, 3, 1, 1, 1, True),
    ("dwconv7x7_c128_16x16", 128, 16, 7, 1, 3, 128, False),
]

# metric name -> (numerator impl, denominator impl, quantity, comparison, target)
TARGETS = {
    "speedup_vs_official": ("official", "kn", "ms", ">=", 6.0),
    "memory_reduction_vs_official": ("official", "kn", "peak_mb", ">=", 4.0),
    "time_vs_conv_bn": ("kn", "conv_bn", "ms", "<=", 1.25),
    "memory_vs_conv_bn": ("kn", "conv_bn", "peak_mb", "<=", 1.5),
    "speedup_bound_vs_official": ("official", "conv", "ms", None, None),  # context for the first target
}


class OfficialStyleKNConv2d(nn.Conv2d):
    """Reference KNConv2d computed the way the official code does: conv + unfold statistics."""

    def __init__(self, channels: int, kernel: int, stride: int, padding: int, groups: int, dropout_p: float):
        super().__init__(channels, channels, kernel, stride, 0, groups=groups, bias=True)
        self.pad, self.dropout_p, self.eps = padding, dropout_p, 1e-5

    def forward(self, x: Tensor) -> Tensor:
        xp = F.pad(x, (self.pad,) * 4)
        out = F.conv2d(xp, self.weight, None, self.stride, 0, 1, self.groups)  # (N, O, H', W')
        d = F.dropout(xp, self.dropout_p, self.training)
        kh, kw = self.kernel_size
        units = d.unfold(2, kh, self.stride[0]).unfold(3, kw, self.stride[1])  # (N, C, H', W', kh, kw)
        var, mean = torch.var_mean(units, dim=(1, 4, 5), correction=0)  # (N, H', W')
        sum_w = self.weight.sum(dim=(1, 2, 3))[None, :, None, None]
        out = (out - mean[:, None] * sum_w) / torch.sqrt(var[:, None] + self.eps)
        return out + self.bias[None, :, None, None]


def _build(impl: str, channels: int, kernel: int, stride: int, padding: int, groups: int) -> nn.Module:
    if impl == "kn":
        return KNConv2d(channels, channels, kernel, stride, padding, groups=groups, dropout_p=DROPOUT_P)
    if impl == "official":
        return OfficialStyleKNConv2d(channels, kernel, stride, padding, groups, DROPOUT_P)
    if impl == "conv":
        return nn.Conv2d(channels, channels, kernel, stride, padding, groups=groups, bias=True)
    if impl == "conv_bn":
        conv = nn.Conv2d(channels, channels, kernel, stride, padding, groups=groups, bias=False)
        return nn.Sequential(conv, nn.BatchNorm2d(channels))
    if impl == "pooled":
        conv = KNConv2d(channels, channels, kernel, stride, padding, groups=groups, dropout_p=DROPOUT_P)

        def pooled(x: Tensor) -> Tensor:
            keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - DROPOUT_P)
            return _kn_conv2d_autograd(
                x, conv.weight, conv.bias, conv.stride, conv.padding, groups, conv.eps, keep, 1 / (1 - DROPOUT_P)
            )

        wrapper = nn.Module()
        wrapper.conv = conv
        wrapper.forward = pooled
        return wrapper
    raise ValueError(f"unknown implementation {impl!r}")


def _step(module: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(grad)

    return run


def _time_ms(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _peak_mb(fn: Callable[[], None], device: torch.device) -> float:
    """Peak of live torch-allocated bytes during fn beyond those live before it (module docstring), in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def _measure(shape: tuple, impls: list[str], repeats: int, device: torch.device) -> dict:
    name, channels, size, kernel, stride, padding, groups, _ = shape
    torch.manual_seed(0)
    x = torch.randn(BATCH, channels, size, size, device=device, requires_grad=True)
    steps = {}
    for impl in impls:
        module = _build(impl, channels, kernel, stride, padding, groups).to(device).train()
        with torch.no_grad():
            grad = torch.randn_like(module(x))
        steps[impl] = _step(module, x, grad)
        steps[impl]()  # warm-up (oneDNN primitive creation, allocator)
    times = {impl: [] for impl in impls}
    for _ in range(repeats):
        for impl in impls:
            times[impl].append(_time_ms(steps[impl], device))
    figures = {}
    for impl in impls:
        _peak_mb(steps[impl], device)  # the first profiled run also counts one-off allocations (oneDNN caches)
        peak = statistics.median(_peak_mb(steps[impl], device) for _ in range(3))
        figures[impl] = {"ms": statistics.median(times[impl]), "peak_mb": peak}
    return figures


def run(quick: bool = False) -> dict:
    """Benchmark every shape on the GPU if there is one (else the CPU); {"cases": [...]} with raw figures, the
    issue-2 ratios and the GPU cost model of `kn_dist.bench.layer_ops` (issue 24)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    heap_kept = False
    if device.type == "cpu":
        torch.set_num_threads(THREADS)
        heap_kept = keep_freed_cpu_memory()  # as in every CPU training process (kn_dist.worker)
    repeats = 3 if quick else 11
    impls = ["kn", "official", "conv_bn", "conv"] + ([] if quick else ["pooled"])
    shapes = SHAPES[:1] if quick else SHAPES
    cases = []
    for shape in shapes:
        name, channels, size, kernel, stride, padding, groups, has_target = shape
        figures = _measure(shape, impls, repeats, device)
        raw = {f"{impl}_{q}": round(figures[impl][q], 3) for impl in impls for q in ("ms", "peak_mb")}
        for metric, (num, den, quantity, op, target) in TARGETS.items():
            ratio = figures[num][quantity] / figures[den][quantity]
            targeted = has_target and target is not None
            met = (ratio >= target if op == ">=" else ratio <= target) if targeted else None
            cases.append(
                {
                    "name": f"{name}/{metric}",
                    "shape": {"batch": BATCH, "channels": channels, "size": size, "kernel": kernel}
                    | {"stride": stride, "padding": padding, "groups": groups},
                    **raw,
                    "ratio": round(ratio, 3),
                    "target": f"{op} {target}" if targeted else None,
                    "met": met,
                }
            )
        cases += layer_ops.cases(name, channels, size, kernel, stride, padding, groups, BATCH if not quick else 8)
    settings = {"device": str(device), "repeats": repeats, "dropout_p": DROPOUT_P, "dtype": "float32"}
    if device.type == "cpu":
        settings |= {"threads": THREADS, "freed_cpu_memory_kept": heap_kept}
    else:
        settings["gpu"] = torch.cuda.get_device_name(device)
    return {"cases": cases, "settings": settings}
