"""`kn-dist demo` / `make demo`: the main job on embedded defaults, end to end on one machine.

Writes the built-in digits dataset, runs the sweep experiments/sweeps/digits_demo.yaml (two
architectures x {published norm, KernelNorm}, ASHA) on a local Ray, records it in the local MLflow
store (./mlflow.db), then prints the best configuration per (architecture, norm), writes the report
and says how to browse everything in the MLflow UI. About 5-10 minutes on a 2-core machine.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from kn_dist.errors import UserError

DEMO_SWEEP = Path(__file__).resolve().parents[1] / "experiments" / "sweeps" / "digits_demo.yaml"


def run_demo() -> int:
    """Run the demo sweep, print the best configs, the report path and the MLflow UI command."""
    from kn_dist.report import best_command, write_report
    from kn_dist.tracking import default_uri
    from kn_dist.tune import run_sweep

    if not DEMO_SWEEP.is_file():
        raise UserError(f"the demo sweep {str(DEMO_SWEEP)!r} is missing; run the demo from a kn_dist checkout")
    # A fresh name per demo: Ray Train and Tune resume whatever has the same name (DESIGN.md §7), and
    # its own MLflow experiment keeps this demo's runs apart from earlier ones.
    name = f"digits_demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    uri = default_uri()
    print(f"[kn-dist] demo: sweep {DEMO_SWEEP.name} as {name!r}; MLflow store {uri}", flush=True)
    start = time.perf_counter()
    run_sweep(DEMO_SWEEP, [f"name={name}", f"tracking.experiment={name}"], tracking_uri=uri)
    minutes = (time.perf_counter() - start) / 60
    print(f"\n[kn-dist] sweep finished in {minutes:.1f} min\n", flush=True)
    best_command(uri, name, None, None, None)
    report = write_report(uri, name, Path("reports") / name)
    db = uri.removeprefix("sqlite:///")
    print(
        f"\nreport: {report.resolve()}\n"
        f"best config as a train file: kn-dist best --experiment {name} --out best.yaml && kn-dist train best.yaml\n"
        f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000\n"
        f"           then open http://127.0.0.1:5000 (experiment {name!r}; trials are nested under the sweep run)"
    )
    return 0
