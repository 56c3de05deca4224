"""Every `kn-dist bench X` prints one JSON object {"cases": [...]} with a ratio and a target per case.

The cheap benches run here in their quick form (figures are not asserted: speed is measured by the
benches on a quiet machine, not by tests); the Ray ones (ray, tune, startup) are run by hand, and here
only their presence and signature are checked.
"""

from __future__ import annotations

import importlib
import inspect
import json

import pytest

from kn_dist.cli import BENCH_TARGETS, main


@pytest.mark.parametrize("target", BENCH_TARGETS)
def test_every_target_has_a_run_function(target):
    module = importlib.import_module(f"kn_dist.bench.{target}")
    assert "quick" in inspect.signature(module.run).parameters
    assert module.__doc__ and "target" in module.__doc__.lower()


@pytest.mark.slow
def test_bench_models_quick_prints_cases_with_ratio_and_target(capsys):
    assert main(["bench", "models", "--quick"]) == 0
    out = json.loads(capsys.readouterr().out)
    (case,) = out["cases"]
    assert case["ratio"] == pytest.approx(case["time_ratio"] / case["flop_ratio"], rel=1e-2)
    assert case["target"] == 1.3 and case["baseline_step_ms"] > 0 and case["kn_step_ms"] > 0


@pytest.mark.slow
def test_bench_gpu_without_cuda_says_where_it_stopped(capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("KN_DIST_GPU_CHECK_JSON", str(tmp_path / "gpu-check.json"))
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the whole check")
    assert main(["bench", "gpu", "--quick"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["completed"] is False and out["cases"] == []
    assert "stopped at step 2 (CUDA device)" in out["stopped_at"] and "stopped at step 2" in captured.err
    assert out["steps"]["1_environment"]["nccl_in_torch"] in (True, False)  # the CPU steps ran first
