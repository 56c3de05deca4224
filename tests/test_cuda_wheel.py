"""The torch build set-up installs for a machine's driver and GPUs (kn_dist/cuda_wheel.py; issue 24, item 3).

References: PyTorch's CUDA support matrix for release 2.14 (pytorch/pytorch#190355: the CUDA 13 default
build covers sm_75-sm_120, the legacy CUDA 12.6 build sm_50-sm_90) and NVIDIA's minimum drivers (CUDA 13:
580, CUDA 12.x: 525.60.13). nvidia-smi is faked: unit tests parse its CSV, and the script itself runs with
a fake executable printing what real drivers print (including an old one without the compute_cap field).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kn_dist import cuda_wheel
from kn_dist.cuda_wheel import choose, diagnose, parse_nvidia_smi

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "csv,build,needle",
    [
        ("580.82.07, 9.0, NVIDIA H100 80GB HBM3", "default", "CUDA 13"),
        ("590.48.01, 8.0, NVIDIA A100-SXM4-40GB\n590.48.01, 8.0, NVIDIA A100-SXM4-40GB", "default", "A100"),
        ("580.65.06, 8.9, NVIDIA GeForce RTX 4090", "default", "sm_89"),  # sm_86 cubins run on 8.9
        ("580.65.06, 7.5, Tesla T4", "default", "CUDA 13"),
        ("535.104.05, 9.0, NVIDIA H100 80GB HBM3", "cu126", "CUDA 12.6"),  # driver too old for CUDA 13
        ("550.54.15, 7.0, Tesla V100-SXM2-16GB", "cu126", "CUDA 12.6"),  # Volta: only the legacy build
        ("580.82.07, 7.0, Tesla V100-SXM2-16GB", "cu126", "V100"),
        ("580.82.07, 7.0, Tesla V100\n580.82.07, 8.0, NVIDIA A100", "cu126", "CUDA 12.6"),  # every GPU must run it
        ("575.57.08, 12.0, NVIDIA GeForce RTX 5090", "cpu", "needs driver >= 580"),  # Blackwell: CUDA 13 only
        ("470.256.02, 3.7, Tesla K80", "cpu", "no CUDA build"),
        ("520.61.05, 8.6, NVIDIA GeForce RTX 3090", "cpu", "525.60.13"),
    ],
)
def test_choice_per_driver_and_gpu(csv, build, needle):
    chosen, reason = choose(parse_nvidia_smi(csv))
    assert chosen == build and needle in reason and "\n" not in reason, reason


def test_no_driver_keeps_the_default_wheel_as_on_cpu_machines():
    assert choose(None)[0] == "default"
    assert choose(parse_nvidia_smi("")) == choose(None)  # nvidia-smi listing no GPU


def test_forced_build_and_a_wrong_one():
    assert choose(None, "cu126") == ("cu126", "set by KN_DIST_TORCH_BUILD")
    with pytest.raises(ValueError, match="KN_DIST_TORCH_BUILD='cu118'"):
        choose(None, "cu118")


def _fake_smi(tmp_path: Path, csv: str, knows_compute_cap: bool = True) -> Path:
    """An executable answering like nvidia-smi; an old one refuses the compute_cap field (exit 2)."""
    exe = tmp_path / "nvidia-smi"
    refuse = (
        ""
        if knows_compute_cap
        else 'case "$1" in *compute_cap*) echo "Field \\"compute_cap\\" is not a valid field" >&2; exit 2;; esac\n'
    )
    exe.write_text(f"#!/bin/sh\n{refuse}cat <<'END'\n{csv}\nEND\n")
    exe.chmod(0o755)
    return exe


def _script(env_extra: dict) -> str:
    env = {**os.environ, **env_extra}
    out = subprocess.run(
        [sys.executable, str(REPO / "kn_dist" / "cuda_wheel.py")], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_script_set_up_runs(tmp_path):
    smi = _fake_smi(tmp_path, "550.54.15, 7.0, Tesla V100-SXM2-16GB")
    build, reason = _script({"KN_DIST_NVIDIA_SMI": str(smi)}).rstrip("\n").split("\t")
    assert build == "cu126" and "V100" in reason
    missing = _script({"KN_DIST_NVIDIA_SMI": str(tmp_path / "absent")})
    assert missing.startswith("default\tno NVIDIA driver")


def test_an_old_nvidia_smi_without_compute_cap_is_judged_by_its_driver(tmp_path):
    smi = _fake_smi(tmp_path, "470.256.02, Tesla K80", knows_compute_cap=False)
    machine = cuda_wheel.query_nvidia_smi(str(smi))
    assert machine is not None and machine.gpus[0].cc is None and machine.driver == (470, 256, 2)
    assert choose(machine)[0] == "cpu"


def test_set_up_asks_this_script_and_installs_from_the_build_index():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "kn_dist/cuda_wheel.py" in setup and "download.pytorch.org/whl/$torch_build" in setup


@pytest.mark.parametrize(
    "torch_cuda,arch,csv,needle",
    [
        (None, [], "580.82.07, 9.0, H100", "CPU build"),
        ("13.0", ["sm_75", "sm_80", "sm_90"], None, "no NVIDIA driver"),
        ("13.0", ["sm_75", "sm_80", "sm_90"], "550.54.15, 9.0, NVIDIA H100", "driver 550.54.15 is older than"),
        ("13.0", ["sm_75", "sm_80", "sm_90", "sm_120"], "580.82.07, 7.0, Tesla V100", "not in this torch's arch list"),
    ],
)
def test_bench_gpu_diagnosis_is_one_line(torch_cuda, arch, csv, needle):
    message = diagnose(torch_cuda, arch, None if csv is None else parse_nvidia_smi(csv))
    assert needle in message and "\n" not in message, message
