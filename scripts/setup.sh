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
pip_install() {
  { .venv/bin/python -m pip install -q "$@" 2>&1; } | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

stamp=.venv/.kn_dist-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing kn_dist and its pinned dependencies into .venv (first time: several minutes)"
  pip_install --upgrade pip setuptools wheel
  # ffcv 1.0.2 ships only an sdist whose build imports numpy/opencv and which declares neither
  # them nor Pillow: install them first and build ffcv against the venv (no build isolation).
  pip_install "torch==2.14.1" "torchvision==0.29.1" numpy cython pkgconfig opencv-python-headless pillow numba
  pip_install --no-build-isolation "ffcv==1.0.2"
  pip_install -e ".[dev]"
  echo "$want" > "$stamp"
fi
