"""scripts/gpu-check.sh and `kn-dist bench gpu` on a machine without CUDA (issue 24, item 4): results that
cannot be lost, time limits that hold, and a one-line reason where the check stops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kn_dist.bench import gpu

REPO = Path(__file__).resolve().parents[1]


def test_a_step_past_its_limit_is_killed_with_its_children():
    start = time.perf_counter()
    step = gpu.run_step(["sh", "-c", "sleep 60 & sleep 60; echo never"], limit=1.0)
    assert step["timed_out"] and step["exit_code"] != 0 and "never" not in step["stdout"]
    assert time.perf_counter() - start < 20


def test_results_of_earlier_steps_survive_a_failing_step(tmp_path, monkeypatch):
    out = tmp_path / "check.json"
    monkeypatch.setenv("KN_DIST_GPU_CHECK_JSON", str(out))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine whose device query fails

    def broken_device():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu, "_device", broken_device)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        gpu.run(quick=True)
    saved = json.loads(out.read_text())
    assert saved["steps"]["1_environment"]["torch"] == torch.__version__ and saved["completed"] is False


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the whole check")
def test_gpu_check_script_without_cuda_exits_3_and_says_why(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = {
        **os.environ,
        "KN_DIST_SKIP_SETUP": "1",
        "KN_DIST_PYTHON": sys.executable,
        "KN_DIST_GPU_CHECK_JSON": str(out),
    }
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu-check.sh"), "--quick"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 3, done.stderr
    saved = json.loads(out.read_text())
    assert json.loads(done.stdout) == saved
    environment = saved["steps"]["1_environment"]
    assert environment["cuda_available"] is False and environment["diagnosis"] and "\n" not in environment["diagnosis"]
    assert {"torch_cuda_build", "arch_list", "driver", "gpus", "setup_would_install"} <= set(environment)
    assert saved["stopped_at"].startswith("stopped at step 2 (CUDA device)")
