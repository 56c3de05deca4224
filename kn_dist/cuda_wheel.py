"""Which torch 2.14.1 build this machine's NVIDIA driver and GPUs can run (issue 24, item 3).

Standard library only: scripts/setup.sh runs this file before torch is installed (`python kn_dist/cuda_wheel.py`
prints `<build>\\t<reason>`), and `kn-dist bench gpu` uses it to say why CUDA is unusable.

torch 2.14.1's Linux x86 builds (PyTorch's CUDA support matrix for release 2.14, pytorch/pytorch#190355):
  default  `pip install torch==2.14.1` from the default index: a CUDA 13 build, cubins for sm_75 sm_80 sm_86
           sm_90 sm_100 sm_120 and sm_120 PTX; CUDA 13 needs driver >= 580.
  cu126    https://download.pytorch.org/whl/cu126, the legacy CUDA 12.6 build: sm_50 sm_60 sm_70 sm_75 sm_80
           sm_86 sm_90; CUDA 12.x runs on driver >= 525.60.13 (minor-version compatibility).
  cpu      https://download.pytorch.org/whl/cpu.
A GPU of compute capability X.Y runs a cubin built for X.Z with Z <= Y (same major), or PTX built for an
older architecture (JIT-compiled). So a V100 (7.0) or a driver older than 580 needs cu126; a Blackwell GPU
(10.0, 12.0) needs the default build and driver >= 580; a GPU or driver that no build fits gets the CPU build.
Without an NVIDIA driver (no nvidia-smi, as on CPU-only machines) set-up keeps the default wheel, which runs
on the CPU, so such a machine installs exactly what it always did. KN_DIST_TORCH_BUILD=default|cu126|cpu
overrides the choice; KN_DIST_NVIDIA_SMI names the nvidia-smi to ask (tests pass a fake one).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

BUILDS = ("default", "cu126", "cpu")
INDEX_URL = {"cu126": "https://download.pytorch.org/whl/cu126", "cpu": "https://download.pytorch.org/whl/cpu"}


@dataclass(frozen=True)
class CudaBuild:
    """A CUDA build of torch: its cubin architectures, PTX architectures and the oldest driver it runs on."""

    name: str
    cuda: str
    cubins: tuple[tuple[int, int], ...]
    ptx: tuple[tuple[int, int], ...]
    min_driver: tuple[int, ...]

    def runs_on(self, cc: tuple[int, int]) -> bool:
        """Whether a GPU of compute capability `cc` can run this build's kernels."""
        return any(c[0] == cc[0] and c[1] <= cc[1] for c in self.cubins) or any(p <= cc for p in self.ptx)

    def arch_list(self) -> str:
        return " ".join(f"sm_{a}{b}" for a, b in self.cubins)


CUDA_BUILDS = (
    CudaBuild("default", "13", ((7, 5), (8, 0), (8, 6), (9, 0), (10, 0), (12, 0)), ((12, 0),), (580,)),
    CudaBuild("cu126", "12.6", ((5, 0), (6, 0), (7, 0), (7, 5), (8, 0), (8, 6), (9, 0)), (), (525, 60, 13)),
)
# the oldest driver each CUDA major version runs on (NVIDIA's CUDA compatibility guide, minor-version compatibility)
MIN_DRIVER = {"11": (450, 80, 2), "12": (525, 60, 13), "13": (580,)}


@dataclass(frozen=True)
class Gpu:
    name: str
    cc: tuple[int, int] | None  # None: this driver's nvidia-smi does not report compute_cap


@dataclass(frozen=True)
class Machine:
    """What nvidia-smi says: the driver version and the GPUs."""

    driver: tuple[int, ...]
    gpus: tuple[Gpu, ...] = field(default_factory=tuple)

    @property
    def driver_text(self) -> str:
        return ".".join(map(str, self.driver))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.strip().split(".") if part.isdigit())


def parse_nvidia_smi(csv: str, with_cc: bool = True) -> Machine | None:
    """`nvidia-smi --query-gpu=driver_version,compute_cap,name --format=csv,noheader` (or without compute_cap)."""
    gpus, driver = [], ()
    for line in csv.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2 or not parts[0][:1].isdigit():
            continue
        driver = _version(parts[0])
        if with_cc and len(parts) >= 3:
            major, _, minor = parts[1].partition(".")
            cc = (int(major), int(minor or 0)) if major.isdigit() else None
            gpus.append(Gpu(",".join(parts[2:]), cc))
        else:
            gpus.append(Gpu(",".join(parts[1:]), None))
    return Machine(driver, tuple(gpus)) if gpus else None


def query_nvidia_smi(executable: str | None = None) -> Machine | None:
    """The driver and GPUs from nvidia-smi, or None where there is no working NVIDIA driver."""
    exe = executable or os.environ.get("KN_DIST_NVIDIA_SMI", "nvidia-smi")
    for fields, with_cc in (("driver_version,compute_cap,name", True), ("driver_version,name", False)):
        try:
            out = subprocess.run(
                [exe, f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode == 0:
            return parse_nvidia_smi(out.stdout, with_cc)
    return None  # nvidia-smi present but failing: no usable driver


def _fits(build: CudaBuild, machine: Machine) -> str | None:
    """None if `build` runs on every GPU of `machine`, else why not."""
    if machine.driver < build.min_driver:
        need = ".".join(map(str, build.min_driver))
        return f"CUDA {build.cuda} needs driver >= {need}, this one is {machine.driver_text}"
    for gpu in machine.gpus:
        if gpu.cc is not None and not build.runs_on(gpu.cc):
            return f"{gpu.name} (sm_{gpu.cc[0]}{gpu.cc[1]}) is not in its arch list ({build.arch_list()})"
    return None


def choose(machine: Machine | None, forced: str | None = None) -> tuple[str, str]:
    """(build, one-line reason): the first of default, cu126 that the driver and every GPU can run, else cpu."""
    if forced:
        if forced not in BUILDS:
            raise ValueError(f"KN_DIST_TORCH_BUILD={forced!r} is not one of {', '.join(BUILDS)}")
        return forced, "set by KN_DIST_TORCH_BUILD"
    if machine is None:
        return "default", "no NVIDIA driver (nvidia-smi missing or failing): the default wheel, which runs on the CPU"
    names = ", ".join(sorted({g.name + ("" if g.cc is None else f" sm_{g.cc[0]}{g.cc[1]}") for g in machine.gpus}))
    why_not = []
    for build in CUDA_BUILDS:
        problem = _fits(build, machine)
        if problem is None:
            return build.name, f"driver {machine.driver_text}, {names}: CUDA {build.cuda} build"
        why_not.append(f"{build.name}: {problem}")
    return "cpu", f"no CUDA build of torch 2.14.1 runs here ({'; '.join(why_not)}): the CPU build"


def diagnose(torch_cuda: str | None, arch_list: list[str], machine: Machine | None) -> str:
    """Why torch.cuda.is_available() is False, in one line (for `kn-dist bench gpu`)."""
    if torch_cuda is None:
        return "this torch is a CPU build (torch.version.cuda is None); run scripts/setup.sh on the GPU machine"
    if machine is None:
        return "no NVIDIA driver: nvidia-smi is missing or fails, so CUDA cannot start"
    need = MIN_DRIVER.get(torch_cuda.split(".")[0])
    choice, _ = choose(machine)
    if need and machine.driver < need:
        return (
            f"driver {machine.driver_text} is older than this torch's CUDA {torch_cuda} needs (>= "
            f"{'.'.join(map(str, need))}): upgrade the driver, or rerun scripts/setup.sh, which installs the "
            f"{choice} build"
        )
    built = CudaBuild("this torch", torch_cuda, _archs(arch_list, "sm_"), _archs(arch_list, "compute_"), ())
    for gpu in machine.gpus:
        if gpu.cc and built.cubins and not built.runs_on(gpu.cc):
            return (
                f"{gpu.name} is sm_{gpu.cc[0]}{gpu.cc[1]}, not in this torch's arch list ({' '.join(arch_list)}): "
                f"rerun scripts/setup.sh, which installs the {choice} build"
            )
    return (
        "driver and arch list fit, yet CUDA is unavailable: check CUDA_VISIBLE_DEVICES and the driver's kernel module"
    )


def _archs(arch_list: list[str], prefix: str) -> tuple[tuple[int, int], ...]:
    """("sm_86", "compute_120", ...) -> ((8, 6), ...) for the entries with `prefix` (sm_: cubins, compute_: PTX)."""
    digits = [a[len(prefix) :] for a in arch_list if a.startswith(prefix) and a[len(prefix) :].isdigit()]
    return tuple((int(d[:-1]), int(d[-1])) for d in digits)


def main() -> int:
    try:
        build, reason = choose(query_nvidia_smi(), os.environ.get("KN_DIST_TORCH_BUILD") or None)
    except ValueError as err:
        print(f"setup: {err}", file=sys.stderr)
        return 2
    print(f"{build}\t{reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
