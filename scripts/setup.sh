#!/usr/bin/env bash
# One idempotent set-up from a fresh clone: system packages ffcv needs, .venv, the package.
# Re-running it does nothing that is already done (a stamp file records the installed pyproject).
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES="pkg-config libopencv-dev libturbojpeg0-dev"
missing=()
for pkg in $SYSTEM_PACKAGES; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "setup: installing system packages ffcv needs: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: ffcv needs system packages that are missing: ${missing[*]}." >&2
    echo "setup: install them first, e.g.: sudo apt-get install -y ${missing[*]}" >&2
    exit 2
  fi
fi

PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY"
  "$PY" -m venv .venv
fi

# pip warns once per package about this machine's local index folders; keep real errors visible.
# No --no-compile: it would save pip's ~50 s of byte-compiling, but with PYTHONDONTWRITEBYTECODE set (as on
# this machine) every Ray worker would then recompile torch's modules from source at each start.
pip_install() {
  { .venv/bin/python -m pip install -q "$@" 2>&1; } | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

# The torch build this machine's NVIDIA driver and GPUs can run (kn_dist/cuda_wheel.py, standard library only):
# "default" (the CUDA 13 wheel of the default index; also what a machine without an NVIDIA driver gets, as
# before), "cu126" (V100s, drivers older than 580) or "cpu" (no build fits). KN_DIST_TORCH_BUILD overrides it.
IFS=$'\t' read -r torch_build torch_reason < <(.venv/bin/python kn_dist/cuda_wheel.py) || true
if [ -z "${torch_build:-}" ]; then
  echo "setup: could not choose a torch build (kn_dist/cuda_wheel.py failed; see above)" >&2
  exit 2
fi
stamp=.venv/.kn_dist-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$torch_build" != "default" ]; then
  want="$want:$torch_build"  # another build than the default is part of what is installed
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing kn_dist and its pinned dependencies into .venv (first time: several minutes)"
  echo "setup: torch build: $torch_build ($torch_reason)"
  pip_install --upgrade pip setuptools wheel
  # ffcv 1.0.2 ships only an sdist whose build imports numpy/opencv and which declares neither
  # them nor Pillow: install them first and build ffcv against the venv (no build isolation).
  if [ "$torch_build" = "default" ]; then
    pip_install "torch==2.14.1" "torchvision==0.29.1" numpy cython pkgconfig opencv-python-headless pillow numba
  else  # torch and torchvision from that build's index, the rest from the default one
    pip_install --index-url "https://download.pytorch.org/whl/$torch_build" "torch==2.14.1" "torchvision==0.29.1"
    pip_install numpy cython pkgconfig opencv-python-headless pillow numba
  fi
  pip_install --no-build-isolation "ffcv==1.0.2"
  pip_install -e ".[dev]"
  echo "$want" > "$stamp"
fi
