"""`kn-dist bench gpu` (scripts/gpu-check.sh): the whole GPU path in one command, no result ever lost (issue 24).

Steps, in order (limits in seconds; meant to end within 10 minutes on one H100 after set-up):
  1_environment: torch, its CUDA version and arch list (torch.cuda.get_arch_list), the NVIDIA driver and each
     GPU's compute capability (nvidia-smi), the torch build set-up would choose (kn_dist.cuda_wheel), NCCL in
     this torch, FFCV importable; where CUDA is unusable, a one-line `diagnosis` of why;
  2_cuda_device: name, capability, bf16, memory; the check stops here without a usable GPU;
  3_gpu_tests (210, 120 per test): `pytest -m "gpu and not ray"`: KernelNorm layers on cuDNN (TF32, bf16, fp16) against
     fp64, every KN family under autocast x channels_last, torch.compile with dropout, a GradScaler step that
     is taken, DDP + SyncBatchNorm over NCCL, FFCV ToDevice loaders (tests/test_gpu.py, tests/test_data.py);
  4_bench_layers (90) and 5_bench_models (90): on the GPU, KernelNorm against cuDNN's conv + BatchNorm;
  6_ray_train_ddp (150): `kn-dist train` of a KernelNorm ConvMixer on digits under Ray Train, one worker with
     DDP forced on (NCCL, scaling.force_ddp), bf16, channels_last and torch.compile; its val_top1 from MLflow;
  7_throughput (60): synthetic CIFAR-size training, KNResNet-18 vs ResNet-18 under bf16, batch 256.
Every step after 2 runs in its own process group, killed at its limit. The JSON summary goes to
$KN_DIST_GPU_CHECK_JSON (default: gpu-check.json) after every step, written atomically, so a step that fails,
hangs or takes the machine down loses none of the steps before it; it is also printed at the end.
`cases`: step 7's KNResNet-18 / ResNet-18 step-time ratio per FLOP, target 1.3 as in `bench models`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kn_dist import cuda_wheel

REPO = Path(__file__).resolve().parents[2]
TARGET = 1.3
LIMITS = {"3_gpu_tests": 210, "4_bench_layers": 90, "5_bench_models": 90, "6_ray_train_ddp": 150, "7_throughput": 60}
PER_TEST_LIMIT = 120


def results_path() -> Path:
    """Where the JSON summary is written after every step."""
    return Path(os.environ.get("KN_DIST_GPU_CHECK_JSON", "gpu-check.json"))


def _write(path: Path, summary: dict) -> None:
    """Atomically: a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(path)


def run_step(cmd: list[str], limit: float, env: dict | None = None) -> dict:
    """Run cmd in its own process group, killed (with its children: Ray, loaders) after `limit` seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    timed_out = False
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return {
        "exit_code": proc.returncode,
        "timed_out": timed_out,
        "limit_s": limit,
        "seconds": round(time.perf_counter() - start, 1),
        "stdout": out,
        "stderr_tail": err[-3000:],
    }


def _json_step(cmd: list[str], limit: float) -> dict:
    """A `kn-dist bench X` step: its JSON result, or why there is none."""
    step = run_step(cmd, limit)
    out = step.pop("stdout")
    try:
        step["result"] = json.loads(out)
    except json.JSONDecodeError:
        step["stdout_tail"] = out[-3000:]
    return step


def _environment() -> dict:
    import torch.distributed as dist

    machine = cuda_wheel.query_nvidia_smi()
    build, reason = cuda_wheel.choose(machine)
    found = {
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "arch_list": torch.cuda.get_arch_list(),
        "driver": machine.driver_text if machine else None,
        "gpus": [{"name": g.name, "compute_capability": g.cc} for g in machine.gpus] if machine else [],
        "setup_would_install": f"{build} ({reason})",
        "nccl_in_torch": dist.is_nccl_available(),
        "ffcv_importable": importlib.util.find_spec("ffcv") is not None,
        "cuda_available": torch.cuda.is_available(),
    }
    if not found["cuda_available"]:
        found["diagnosis"] = cuda_wheel.diagnose(torch.version.cuda, found["arch_list"], machine)
    return found


def _device() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "count": torch.cuda.device_count(),
        "compute_capability": f"{props.major}.{props.minor}",
        "bf16": (props.major, props.minor) >= (8, 0),
        "memory_gib": round(props.total_memory / 2**30, 1),
    }


def _ray_train(limit: float) -> dict:
    """One `kn-dist train` under Ray Train with DDP forced on one GPU (NCCL), bf16, channels_last, compile."""
    with tempfile.TemporaryDirectory(prefix="kn-gpu-check-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        overrides = [
            "model.norm=kn", "scaling.num_workers=1", "scaling.in_process=false", "scaling.use_gpu=true",
            "scaling.force_ddp=true", "precision=bf16", "channels_last=true", "compile=true",
            "deterministic=false", f"data.root={tmp}/data", f"checkpoint.storage_path={tmp}/runs",
        ]  # fmt: skip
        cmd = [sys.executable, "-m", "kn_dist.cli", "train", str(REPO / "experiments" / "digits_quick.yaml")]
        step = run_step([*cmd, *overrides, "--tracking-uri", uri, "--address", "local"], limit)
        step["stdout_tail"] = step.pop("stdout")[-3000:]
        step["overrides"] = overrides
        if step["exit_code"] == 0:
            from mlflow import MlflowClient

            client = MlflowClient(uri)
            (run,) = client.search_runs([client.get_experiment_by_name("digits_quick").experiment_id])
            step["val_top1"] = run.data.metrics.get("val_top1")
            step["passed"] = run.info.status == "FINISHED" and (step["val_top1"] or 0) >= 0.9
        return step


def throughput(quick: bool) -> dict:
    """Step 7 (run in its own process by `run`): KNResNet-18 vs ResNet-18, synthetic CIFAR batches, bf16."""
    from kn_dist.bench.models import bench_pair

    batch, repeats = (64, 3) if quick else (256, 20)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        case = bench_pair("resnet18_cifar", "bn", "kn", repeats, batch, torch.device("cuda", 0))
    return case | {"name": "knresnet18_vs_resnet18_cifar_bf16_synthetic", "target": TARGET}


def run(quick: bool = False) -> dict:
    """Every step this machine can run; the summary is written to `results_path()` after each."""
    out = results_path()
    summary: dict = {"cases": [], "completed": False, "stopped_at": None, "results_file": str(out), "steps": {}}
    steps = summary["steps"]
    steps["1_environment"] = _environment()
    _write(out, summary)
    if not torch.cuda.is_available():
        why = steps["1_environment"]["diagnosis"]
        message = f"stopped at step 2 (CUDA device): torch.cuda.is_available() is False: {why}"
        print(f"kn-dist bench gpu: {message}", file=sys.stderr)
        summary["stopped_at"] = message
        _write(out, summary)
        return summary
    steps["2_cuda_device"] = _device()
    _write(out, summary)
    py = [sys.executable]
    # the Ray Train run is step 6 (tests/test_gpu.py has it too, for `pytest -m gpu` by hand)
    pytest_args = [
        "-m",
        "pytest",
        "-q",
        "-m",
        "gpu and not ray",
        "-p",
        "no:cacheprovider",
        f"--timeout={PER_TEST_LIMIT}",
    ]
    step = run_step([*py, *pytest_args, str(REPO / "tests")], LIMITS["3_gpu_tests"])
    lines = step.pop("stdout").splitlines()
    step["summary"] = next((line for line in reversed(lines) if " passed" in line or " failed" in line), None)
    step["failures"] = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    steps["3_gpu_tests"] = step
    _write(out, summary)
    bench = [*py, "-m", "kn_dist.cli", "bench"]
    steps["4_bench_layers"] = _json_step([*bench, "layers", *(["--quick"] if quick else [])], LIMITS["4_bench_layers"])
    _write(out, summary)
    steps["5_bench_models"] = _json_step([*bench, "models", *(["--quick"] if quick else [])], LIMITS["5_bench_models"])
    _write(out, summary)
    steps["6_ray_train_ddp"] = _ray_train(LIMITS["6_ray_train_ddp"])
    _write(out, summary)
    code = f"import json; from kn_dist.bench.gpu import throughput; print(json.dumps(throughput({quick})))"
    steps["7_throughput"] = _json_step([*py, "-c", code], LIMITS["7_throughput"])
    if "result" in steps["7_throughput"]:
        summary["cases"] = [steps["7_throughput"].pop("result")]
    summary["completed"] = steps["3_gpu_tests"]["exit_code"] == 0 and bool(steps["6_ray_train_ddp"].get("passed"))
    _write(out, summary)
    return summary
