"""`kn-dist bench startup`: what a run costs before and around its training (issue 13, item 4).

Two processes do the same 1-epoch digits run (experiments/digits_quick.yaml, one worker, CPU):
  - `kn_dist`: the real `kn-dist train ... epochs=1 scaling.num_workers=1` command in a fresh process:
    config, MLflow run, model, FFCV loaders, the epoch, checkpoint, final artifacts, exit. One worker on
    this machine trains in the kn-dist process itself (kn_dist.in_process);
  - `ray_train` (a second case, no target): the same command with `scaling.in_process=false`, so Ray,
    the Ray Train controller and a worker actor start first (what every run paid before);
  - `bare`: a fresh `python` process that imports torch and kn_dist's data/models/engine, builds the
    same model and loaders and trains and validates the same epoch, with no Ray and no MLflow.
Both walls are measured from the moment the process is launched to its exit (imports included).
The breakdown of the kn_dist run comes from the marks the run itself records (MLflow tags
kn_dist.timeline.driver and kn_dist.timeline.rank0, kn_dist.runtime.mark). Runs alternate
bare / kn_dist / ray_train; figures are medians. ratio = kn_dist wall / bare wall; target <= 2.5 (or
<= 18 s).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DIGITS = Path(__file__).resolve().parents[2] / "experiments" / "digits_quick.yaml"
TARGET = 2.5
TARGET_WALL_S = 18.0

# The bare side, run as `python -c`: everything the worker does for one epoch, nothing else.
BARE = r"""
import json, sys, time
marks = {"launched": float(sys.argv[1])}
import torch
from kn_dist import config, data, engine
from kn_dist.models import create_model
from kn_dist.prepare import prepare_config
marks["imported"] = time.time()
cfg = prepare_config(config.load(sys.argv[2], sys.argv[3:]))
torch.set_num_threads(int(cfg.scaling.cpus_per_worker))
device = torch.device("cpu")
torch.manual_seed(cfg.seed)
model = create_model(cfg.model.name, norm=cfg.model.norm, num_classes=cfg.model.num_classes, **cfg.model.kwargs)
marks["model_built"] = time.time()
train = data.train_loader(cfg.data, 0, 1, device, seed=cfg.seed)
val = data.eval_loader(cfg.data, 0, 1, device, split="val")
marks["loaders_built"] = time.time()
next(iter(train))
marks["first_batch"] = time.time()
optimizer = engine.build_optimizer(model, cfg.optim)
scheduler = engine.build_scheduler(optimizer, cfg.schedule, cfg.epochs, len(train))
scaler = engine.build_scaler(cfg.precision, device)
engine.train_epoch(model, train, optimizer, scheduler, scaler, device=device)
engine.evaluate(model, val, device=device)
marks["first_epoch_done"] = time.time()
print("MARKS " + json.dumps(marks))
"""


def _overrides(root: Path, name: str) -> list[str]:
    return [
        "epochs=1",
        "scaling.num_workers=1",
        f"name={name}",
        f"data.root={root / 'data'}",
        f"checkpoint.storage_path={root / 'runs'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
    ]


def _bare(root: Path) -> dict[str, float]:
    launched = time.time()
    out = subprocess.run(
        [sys.executable, "-c", BARE, str(launched), str(DIGITS), *_overrides(root, "bare")],
        capture_output=True,
        text=True,
        check=True,
    )
    marks = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("MARKS "))[6:])
    marks["exited"] = time.time()
    return _spans(
        marks,
        [
            ("wall_s", "launched", "exited"),
            ("imports_s", "launched", "imported"),
            ("config_and_model_s", "imported", "model_built"),
            ("loader_build_s", "model_built", "loaders_built"),
            ("first_batch_s", "loaders_built", "first_batch"),
            ("epoch_s", "first_batch", "first_epoch_done"),
        ],
    )


def _kn_dist(root: Path, name: str, extra: tuple[str, ...] = ()) -> dict[str, float]:
    from mlflow import MlflowClient

    from kn_dist import config
    from kn_dist.runtime import TIMELINE_TAG

    cli = Path(sys.executable).with_name("kn-dist")
    launched = time.time()
    subprocess.run(
        [str(cli), "train", str(DIGITS), *_overrides(root, name), *extra], capture_output=True, text=True, check=True
    )
    exited = time.time()
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(config.load(DIGITS).tracking.experiment)
    (run,) = client.search_runs([exp.experiment_id], f"params.name = '{name}'")
    marks = {"launched": launched, "exited": exited}
    for role in ("driver", "rank0"):  # the two processes' marks have distinct names (one process in_process)
        marks |= json.loads(run.data.tags[TIMELINE_TAG.format(role=role)])
    return _spans(
        marks,
        [
            ("wall_s", "launched", "exited"),
            ("driver_imports_s", "launched", "cli_started"),
            ("config_prepare_s", "cli_started", "config_prepared"),  # with the lazy data/MLflow imports
            ("mlflow_run_and_ray_start_s", "config_prepared", "fit_started"),
            ("controller_and_worker_start_s", "fit_started", "loop_started"),  # ~0 in process
            ("model_build_s", "loop_started", "model_built"),
            ("loader_build_s", "model_built", "loaders_built"),
            ("epoch_with_first_batch_s", "loaders_built", "first_epoch_done"),
            ("after_epoch_to_exit_s", "first_epoch_done", "exited"),
        ],
    )


def _spans(marks: dict[str, float], spans: list[tuple[str, str, str]]) -> dict[str, float]:
    """{name: seconds from mark `start` to mark `end`} for each (name, start, end)."""
    return {name: marks[end] - marks[start] for name, start, end in spans}


def _medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in rows), 2) for key in rows[0]}


def run(quick: bool = False) -> dict:
    """{"cases": [...]}: medians of both sides, the kn_dist breakdown, and the ratio of the walls."""
    repeats = 1 if quick else 3
    bare, kn, ray_train = [], [], []
    with tempfile.TemporaryDirectory(prefix="kn_bench_startup_") as tmp:
        root = Path(tmp)
        for i in range(repeats):  # interleaved: all sides see the same background load
            bare.append(_bare(root))
            kn.append(_kn_dist(root, f"startup_{i}"))
            if not quick:
                ray_train.append(_kn_dist(root, f"startup_ray_{i}", ("scaling.in_process=false",)))
    bare_m, kn_m = _medians(bare), _medians(kn)
    cases = [
        {
            "name": "digits_quick 1 epoch, 1 worker, CPU: kn-dist train vs bare process",
            "kn_dist_wall_s": kn_m["wall_s"],
            "bare_wall_s": bare_m["wall_s"],
            "kn_dist_breakdown_s": kn_m,
            "bare_breakdown_s": bare_m,
            "repeats": repeats,
            "kn_dist_walls_s": [round(r["wall_s"], 2) for r in kn],
            "bare_walls_s": [round(r["wall_s"], 2) for r in bare],
            "ratio": round(kn_m["wall_s"] / bare_m["wall_s"], 3),
            "target": TARGET,
            "target_wall_s": TARGET_WALL_S,
            "met": kn_m["wall_s"] <= TARGET_WALL_S or kn_m["wall_s"] / bare_m["wall_s"] <= TARGET,
        }
    ]
    if ray_train:
        ray_m = _medians(ray_train)
        cases.append(
            {
                "name": "the same run under Ray Train (scaling.in_process=false) vs bare process, no target",
                "kn_dist_wall_s": ray_m["wall_s"],
                "bare_wall_s": bare_m["wall_s"],
                "kn_dist_breakdown_s": ray_m,
                "kn_dist_walls_s": [round(r["wall_s"], 2) for r in ray_train],
                "ratio": round(ray_m["wall_s"] / bare_m["wall_s"], 3),
                "target": None,
            }
        )
    return {"cases": cases}
