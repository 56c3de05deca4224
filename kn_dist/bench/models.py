"""`kn-dist bench models`: training-step cost of KernelNorm vs. each family's baseline norm, CIFAR size.

For every model in MODELS that is registered (CIFAR-size, 32 px), the published norm (the registry's
default) is compared with each KernelNorm variant (every supported norm whose name starts with "kn"):
  - step time: one training step = forward + cross-entropy + backward + SGD (momentum 0.9) step on a
    fixed random batch, train mode (dropout on KernelNorm's statistics on);
  - images/s = batch / step time;
  - peak memory of the step beyond what existed before it (weights, momentum, batch): on CUDA the
    allocator's max_memory_allocated; on CPU the running total of torch's allocation events under
    torch.profiler(profile_memory=True), as `kn_dist.bench.layers` does (tensors, not malloc caches);
  - forward FLOPs of one image (`kn_dist.models.summary.forward_flops`: matmuls and convs).
Target (issue 3): ratio = (kn step time / baseline step time) / (kn FLOPs / baseline FLOPs) <= 1.3,
i.e. KernelNorm costs at most 30 % more per FLOP than the norm it replaces.

Method: batch 32, fp32; on CPU torch.set_num_threads(2). Both models of a pair are warmed up, then
stepped in turn (interleaved) `repeats` times and the medians are compared, because the machine is
shared and noisy. To add a model (e.g. another CIFAR family), append its registry name to MODELS.
"""

import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from kn_dist.engine import COMPILE_CONFIG
from kn_dist.models import create_model, list_models, model_info
from kn_dist.models._registry import shape_probe
from kn_dist.models.summary import forward_flops
from kn_dist.runtime import keep_freed_cpu_memory

# One CIFAR-size model per family; entries that are not registered (yet) are skipped.
MODELS = ["resnet18_cifar", "densenet_bc100", "convnext_cifar", "convmixer_256_8", "vit_cifar", "conformer_tiny_cifar"]
BATCH = 32
THREADS = 2
TARGET = 1.3
NUM_CLASSES = 10


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        outs = out if isinstance(out, tuple) else (out,)  # Conformer: one logit tensor per branch
        loss = sum(F.cross_entropy(o, y) for o in outs) / len(outs)
        loss.backward()
        opt.step()

    return step


def _time_s(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _peak_mb(step: Callable[[], None], device: torch.device) -> float:
    """Peak bytes allocated during one step beyond those live before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def _gflops(name: str, norm: str, size: int) -> float:
    with torch.device("meta"):
        model = create_model(name, norm=norm, num_classes=NUM_CLASSES)
    return forward_flops(shape_probe(model), size) / 1e9


def bench_pair(
    name: str, baseline: str, kn: str, repeats: int, batch: int, device: torch.device, compiled: bool = False
) -> dict:
    """Side-by-side figures of `name` with norm `baseline` and norm `kn`, and the issue's ratio."""
    size = model_info(name).input_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    steps = {}
    for norm in (baseline, kn):
        torch.manual_seed(0)
        model = create_model(name, norm=norm, num_classes=NUM_CLASSES).to(device).train()
        steps[norm] = _step_fn(torch.compile(model, dynamic=False) if compiled else model, x, y)
        # warm-up: oneDNN/cuDNN primitives, allocator, momentum buffers (compiled: forward and backward compile)
        for _ in range(3 if compiled else 2):
            steps[norm]()
    times: dict[str, list[float]] = {baseline: [], kn: []}
    for _ in range(repeats):
        for norm in (baseline, kn):
            times[norm].append(_time_s(steps[norm], device))
    fig = {}
    for norm in (baseline, kn):
        t = statistics.median(times[norm])
        fig[norm] = {
            "step_ms": 1e3 * t,
            "images_per_s": batch / t,
            "peak_mem_mb": _peak_mb(steps[norm], device),
            "gflops": _gflops(name, norm, size),
        }
    time_ratio = fig[kn]["step_ms"] / fig[baseline]["step_ms"]
    flop_ratio = fig[kn]["gflops"] / fig[baseline]["gflops"]
    ratio = time_ratio / flop_ratio
    case = {"name": _label(name, baseline, kn, compiled), "model": name, "baseline_norm": baseline, "kn_norm": kn}
    case["compiled"] = compiled
    for role, norm in (("baseline", baseline), ("kn", kn)):
        case |= {f"{role}_{key}": round(value, 3) for key, value in fig[norm].items()}
    return case | {
        "time_ratio": round(time_ratio, 3),
        "flop_ratio": round(flop_ratio, 3),
        "memory_ratio": round(fig[kn]["peak_mem_mb"] / fig[baseline]["peak_mem_mb"], 3),
        "ratio": round(ratio, 3),
        "target": TARGET,
        "met": ratio <= TARGET,
    }


def _label(name: str, baseline: str, kn: str, compiled: bool) -> str:
    return f"{name}/{kn}_vs_{baseline}" + (" (compiled)" if compiled else "")


def _bench_or_error(name: str, base: str, kn: str, repeats: int, batch: int, device: torch.device, compiled: bool):
    """bench_pair, or a case that names the error: one pair that fails does not lose the others' figures."""
    if compiled:
        # Each pair compiles afresh, as a training process would (dynamo's caches and recompile counts
        # are process-wide).
        torch.compiler.reset()
    try:
        return bench_pair(name, base, kn, repeats, batch, device, compiled=compiled)
    except Exception as err:  # reported in the JSON and on stderr, not hidden
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        print(f"bench models: {name} {kn} vs {base} failed: {message}", file=sys.stderr)
        label = _label(name, base, kn, compiled)
        return {"name": label, "error": message, "ratio": None, "target": TARGET, "met": False}


def pairs() -> list[tuple[str, str, str]]:
    """(model, baseline norm, KernelNorm norm) for every registered entry of MODELS."""
    registered = set(list_models())
    out = []
    for name in MODELS:
        if name in registered:
            info = model_info(name)
            out += [(name, info.default_norm, n) for n in info.norms if n.startswith("kn")]
    return out


def run(quick: bool = False, compile: bool = False) -> dict:
    """Benchmark every pair (both models torch.compile'd with `compile`); {"cases": [...], "settings": {...}}."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    heap_kept = False
    if device.type == "cpu":
        torch.set_num_threads(THREADS)
        heap_kept = keep_freed_cpu_memory()  # as in every CPU training process (kn_dist.worker)
    repeats = 3 if quick else 11
    batch = 8 if quick else BATCH
    todo = pairs()[:1] if quick else pairs()
    # Compiled: the settings the worker trains with (engine.COMPILE_CONFIG): static shapes, and room for a
    # recompile per module instance. Both models of a pair share their classes' code, so dynamo recompiles
    # it for the second model; by default it then makes the differing sizes dynamic, and with torch 2.14 on
    # CPU inductor failed on the Conformer pair that way (InductorError "Cannot convert expression to
    # float"; each model alone compiled), and stopped compiling a code object after 8 versions (eager from
    # then on). Static shapes also compile faster (the Conformer pair: 1.5 instead of 4.5 minutes here).
    with torch._dynamo.config.patch(**COMPILE_CONFIG):
        cases = [_bench_or_error(name, base, kn, repeats, batch, device, compile) for name, base, kn in todo]
    settings = {"device": str(device), "batch": batch, "repeats": repeats, "dtype": "float32", "compile": compile}
    if device.type == "cpu":
        settings["threads"] = THREADS
        settings["freed_cpu_memory_kept"] = heap_kept
    else:
        settings["gpu"] = torch.cuda.get_device_name(device)
    return {"cases": cases, "settings": settings}
