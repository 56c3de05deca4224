#!/usr/bin/env bash
# The GPU check in one command (issue 13, item 5): set-up, then `kn-dist bench gpu`, one JSON summary.
# On a machine without CUDA it runs the CPU steps and says clearly where it stopped (exit code 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
out=$(.venv/bin/kn-dist bench gpu "$@")
echo "$out"
python3 -c 'import json, sys; sys.exit(0 if json.loads(sys.argv[1])["completed"] else 3)' "$out"
