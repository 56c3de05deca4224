"""What a sweep or a study prints while Tune runs: one line when a trial starts, one per epoch, one at its end.

Tune's own console output (boxed trial tables, TensorBoard hints) is off (`quiet_tune`) and the trials'
own output stays in Ray's log files (init_ray(worker_output=False)): Tune ignores custom progress
reporters since its new output engine, so this is a tune.Callback on the driver.
"""

from __future__ import annotations

import os
from typing import Any

from kn_dist.runtime import say


def _describe(config: dict[str, Any]) -> tuple[str, str]:
    """(name, what it trains) of a Tune trial config: a sweep segment or a study's final."""
    if "final" in config:  # its run key: final:<study>:<model/norm>:<study seed>
        _, _, cell, seed = str(config["final"]).rsplit(":", 3)
        return f"final {cell} seed {seed}", "test once at the end"
    shown = {k: v for k, v in config.items() if k.startswith(("optim.", "model.kwargs.kn_", "schedule.", "data."))}
    values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(shown.items()))
    cell = f"{config.get('model.name')}/{config.get('model.norm')}"
    return f"{cell} {config.get('kn_dist.trial')}", f"seed {config.get('seed')}, {values or 'defaults'}"


def quiet_tune() -> None:
    """Tune prints nothing itself: its new output engine prints an experiment box, the results folder and a
    TensorBoard hint even at verbose=0 (ray/tune/experimental/output.py), the classic engine with
    verbose=0 prints nothing. Read by Tune when a Tuner fits."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"


def make_console_callback(epochs: int) -> Any:
    """A tune.Callback printing the lines described above for runs of `epochs` epochs."""
    from ray import tune

    class Console(tune.Callback):
        def __init__(self) -> None:
            self.last_epoch: dict[str, int] = {}

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            name, what = _describe(trial.config)
            stop = trial.config.get("kn_dist.stop", epochs)
            say(f"{name} starts ({what}), to epoch {stop} of {epochs}")

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            epoch = int(result.get("epoch", 0))
            if epoch <= self.last_epoch.get(trial.trial_id, 0) or "val_top1" not in result:
                return
            self.last_epoch[trial.trial_id] = epoch
            name, _ = _describe(trial.config)
            say(
                f"{name} epoch {epoch}/{epochs}: val top-1 {100 * result['val_top1']:.2f} %, "
                f"{result.get('epoch_seconds', 0.0):.1f} s"
            )

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            name, _ = _describe(trial.config)
            last = trial.last_result or {}
            figure = f"val top-1 {100 * last['val_top1']:.2f} %" if "val_top1" in last else "no result"
            test = f", test top-1 {100 * last['test_top1']:.2f} %" if "test_top1" in last else ""
            say(f"{name} ends at epoch {last.get('epoch', '?')}: {figure}{test}")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            name, _ = _describe(trial.config)
            say(f"{name} failed (Tune's error file: {trial.error_file or 'n/a'})")

    return Console()
