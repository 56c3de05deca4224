#!/usr/bin/env bash
# The GPU check in one command (issue 13 item 5, issue 24 item 4): set-up, then `kn-dist bench gpu`.
# Results cannot be lost: `kn-dist bench gpu` writes its JSON summary to $KN_DIST_GPU_CHECK_JSON (default
# gpu-check.json here) after every step, each step has a time limit (kn_dist/bench/gpu.py, about 10 minutes in
# all on one H100), and the whole check is killed after 11 minutes at the latest. No `set -e`: a failing step
# must not end the script before the file is reported. Exit 0: every step passed; 3: the check stopped (no
# usable CUDA: the JSON's 1_environment.diagnosis says why) or a step failed; 2: set-up failed.
# KN_DIST_SKIP_SETUP=1 skips set-up and KN_DIST_PYTHON picks the interpreter (tests run it that way).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${KN_DIST_SKIP_SETUP:-}" ]; then
  bash scripts/setup.sh >&2 || { echo "gpu-check: set-up failed (see above)" >&2; exit 2; }
fi
py=${KN_DIST_PYTHON:-.venv/bin/python}
export KN_DIST_GPU_CHECK_JSON=${KN_DIST_GPU_CHECK_JSON:-gpu-check.json}
timeout --kill-after=30 660 "$py" -m kn_dist.cli bench gpu "$@" >/dev/null
status=$?
if [ ! -s "$KN_DIST_GPU_CHECK_JSON" ]; then
  echo "gpu-check: no results were written to $KN_DIST_GPU_CHECK_JSON (exit status $status)" >&2
  exit 3
fi
cat "$KN_DIST_GPU_CHECK_JSON"
echo "gpu-check: results in $KN_DIST_GPU_CHECK_JSON (bench exit status $status)" >&2
"$py" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["completed"] else 3)' "$KN_DIST_GPU_CHECK_JSON"
