"""The sweep's Ray Tune searcher: the grid cells in turn, one sampler per cell (kn_dist.sweep's plan)."""

from __future__ import annotations

import pickle
from typing import Any

from kn_dist.sweep import Sweep, trial_plan


def make_searcher(sweep: Sweep) -> Any:
    """A Ray Tune Searcher that walks the cells round-robin and samples each cell's own space.

    Ray's Optuna integration refuses grid_search keys, and KernelNorm keys must not reach baseline
    cells (the models refuse kn_* arguments for other norms), so each cell gets its own sampler:
    seeded random sampling, or one Optuna TPE study per cell (a cell's best lr is its own).
    """
    import numpy as np
    from ray.tune.search import Searcher

    class CellSearcher(Searcher):
        def __init__(self) -> None:
            super().__init__(metric=sweep.tune.metric, mode=sweep.tune.mode)
            self.plan = trial_plan(sweep)
            self.next = 0
            self.sampled: dict[tuple[int, int], dict[str, Any]] = {}  # (cell, sample) -> values
            self.optuna_trials: dict[str, int] = {}  # tune trial id -> cell whose study suggested it
            self.studies: dict[int, Any] = {}

        def _study(self, cell: int) -> Any:
            if cell not in self.studies:
                import optuna
                from ray.tune.search.optuna import OptunaSearch

                space = {k: s.domain() for k, s in sweep.cells[cell].space.items()}
                sampler = optuna.samplers.TPESampler(seed=sweep.tune.search_seed + cell)
                self.studies[cell] = OptunaSearch(space, metric=self.metric, mode=self.mode, sampler=sampler)
            return self.studies[cell]

        def suggest(self, trial_id: str) -> dict | str | None:
            if self.next >= len(self.plan):
                return Searcher.FINISHED
            index, (cell, sample, rep) = self.next, self.plan[self.next]
            space = sweep.cells[cell].space
            if (cell, sample) not in self.sampled:
                if not space:
                    values = {}
                elif sweep.tune.search == "optuna":
                    values = self._study(cell).suggest(trial_id)
                    if values is None:
                        return None  # Optuna is waiting for results; Tune asks again later
                    self.optuna_trials[trial_id] = cell
                else:
                    rng = np.random.default_rng([sweep.tune.search_seed, cell, sample])
                    values = {k: s.domain().sample(random_state=rng) for k, s in space.items()}
                self.sampled[(cell, sample)] = {k: _plain(v) for k, v in values.items()}
            self.next += 1
            seed = sweep.tune.seeds[rep] if sweep.tune.seeds else sweep.base.seed + index
            return {**sweep.cells[cell].values, **self.sampled[(cell, sample)], "seed": seed}

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id in self.optuna_trials:
                self._study(self.optuna_trials[trial_id]).on_trial_complete(trial_id, result, error)

        def save(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "wb") as f:
                pickle.dump({k: v for k, v in self.__dict__.items() if k in _STATE}, f)

        def restore(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "rb") as f:
                self.__dict__.update(pickle.load(f))

    return CellSearcher()


_STATE = ("next", "sampled", "optuna_trials", "studies")


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers, so configs and YAML hold plain values."""
    return value.item() if hasattr(value, "item") else value
