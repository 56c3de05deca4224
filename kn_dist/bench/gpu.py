"""`kn-dist bench gpu` (scripts/gpu-check.sh): the whole GPU path in one command (issue 13, item 5).

Steps, in order; each one's outcome goes into the JSON summary printed at the end:
  1. environment (CPU): torch / CUDA build, NCCL in this torch, FFCV importable, the GPU tests collected;
  2. CUDA device (first CUDA step): stops here, saying so, on a machine without one;
  3. `pytest -m gpu`: bf16 / fp16 autocast, channels_last, torch.compile, FFCV ToDevice loaders, a 1-GPU
     NCCL run through Ray Train (tests/test_gpu.py, tests/test_data.py);
  4. `bench layers` and 5. `bench models` on the GPU, against cuDNN BatchNorm;
  6. synthetic CIFAR-size training throughput, KNResNet-18 vs ResNet-18 under bf16 autocast,
     batch 256: images/s of each and their ratio.
Meant for a GPU machine where it takes a few minutes (a 10-minute budget); the cases' `ratio` is step 6's
KNResNet-18 / ResNet-18 step-time ratio per FLOP, target 1.3 as in `bench models`.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TARGET = 1.3


def _environment(quick: bool) -> dict:
    import torch.distributed as dist

    found = {
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "nccl_in_torch": dist.is_nccl_available(),
        "ffcv_importable": importlib.util.find_spec("ffcv") is not None,
    }
    if quick:  # a smoke check: collecting the whole suite takes ~15 s
        return found
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "gpu", str(REPO / "tests")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    tail = [line for line in collected.stdout.splitlines() if "selected" in line or "collected" in line]
    return found | {"gpu_tests": tail[-1] if tail else collected.stdout[-300:]}


def _gpu_tests() -> dict:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(REPO / "tests")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    summary = [line for line in out.stdout.splitlines() if " passed" in line or " failed" in line or "error" in line]
    return {"exit_code": out.returncode, "summary": summary[-1] if summary else out.stdout[-500:]} | {
        "seconds": round(time.perf_counter() - start, 1)
    }


def _throughput(quick: bool) -> dict:
    from kn_dist.bench.models import bench_pair

    batch, repeats = (64, 3) if quick else (256, 20)
    device = torch.device("cuda", 0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return bench_pair("resnet18_cifar", "bn", "kn", repeats, batch, device)


def run(quick: bool = False) -> dict:
    """Every step that this machine can run; `stopped_at` names the first one it could not."""
    steps: dict[str, dict] = {"1_environment": _environment(quick)}
    if not torch.cuda.is_available():
        message = (
            "stopped at step 2 (CUDA device): torch.cuda.is_available() is False on this machine, so the GPU "
            "tests, bench layers / models on the GPU and the throughput run did not run"
        )
        print(f"kn-dist bench gpu: {message}", file=sys.stderr)
        return {"cases": [], "completed": False, "stopped_at": message, "steps": steps}
    steps["2_cuda_device"] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    steps["3_gpu_tests"] = _gpu_tests()
    from kn_dist.bench import layers, models

    steps["4_bench_layers"] = layers.run(quick=quick)
    steps["5_bench_models"] = models.run(quick=quick)
    case = _throughput(quick)
    case["name"] = "knresnet18_vs_resnet18_cifar_bf16_synthetic"
    case["target"] = TARGET
    completed = steps["3_gpu_tests"]["exit_code"] == 0
    return {"cases": [case], "completed": completed, "stopped_at": None, "steps": steps}
