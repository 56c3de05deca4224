"""`kn-dist demo` / `make demo`: the main job on embedded defaults, end to end on one machine.

Runs the study experiments/studies/digits_demo.yaml (ConvMixer-256/8 with BatchNorm vs KernelNorm on the
built-in digits dataset: a sweep scored on val, the best configuration per norm retrained with 3 seeds
and evaluated on test) on a local Ray, records it in the local MLflow store (./mlflow.db), and prints
the answer, the report path and how to browse everything in the MLflow UI.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from kn_dist.errors import UserError
from kn_dist.runtime import say

DEMO_STUDY = Path(__file__).resolve().parents[1] / "experiments" / "studies" / "digits_demo.yaml"


def run_demo() -> int:
    """Run the demo study; its report and the MLflow UI command are printed at the end."""
    from kn_dist.study import run_study
    from kn_dist.tracking import default_uri

    if not DEMO_STUDY.is_file():
        raise UserError(f"the demo study {str(DEMO_STUDY)!r} is missing; run the demo from a kn_dist checkout")
    # A fresh name per demo: Ray Train and Tune resume whatever has the same name (DESIGN.md §7), and
    # its own MLflow experiment keeps this demo's runs apart from earlier ones.
    name = f"digits_demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    uri = default_uri()
    say(f"demo: study {DEMO_STUDY.name} as {name!r}; MLflow store {uri}")
    start = time.perf_counter()
    run_study(DEMO_STUDY, [f"name={name}", f"tracking.experiment={name}"], tracking_uri=uri)
    say(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min")
    return 0
