"""The sweep's Ray Tune searcher: it hands out the segments kn_dist.sweep_progress decides, with their values.

Each suggestion is one segment: a trial (cell, sample, replicate) trained up to a stop epoch, with the
cell's fixed values, the sample's drawn values and the trial's seed. Values come from kn_dist.sweep's
paired random draws, or, with `search: optuna`, from one Optuna TPE study per cell (a cell's best lr is
its own; such draws are not paired across norms, so studies refuse optuna). While a cell waits for its
rung to complete the searcher answers None (Tune asks again later); when nothing is left, FINISHED.
"""

from __future__ import annotations

import pickle
from typing import Any

from kn_dist.sweep import Sweep, sample_values, trial_seed
from kn_dist.sweep_progress import SweepProgress, TrialKey

# Tune config keys that carry the segment: which trial, and the epoch it stops after.
TRIAL_KEY, STOP_KEY = "kn_dist.trial", "kn_dist.stop"


def segment_keys(trial: dict[str, Any]) -> tuple[TrialKey, int]:
    """(trial, stop epoch) of a Tune trial config made by this searcher."""
    return TrialKey.parse(trial[TRIAL_KEY]), int(trial[STOP_KEY])


def make_searcher(sweep: Sweep, progress: SweepProgress, values: dict[tuple[int, int], dict[str, Any]]) -> Any:
    """A Ray Tune Searcher over `progress`; `values` holds the drawn values of candidates already started
    (read back from their runs), and receives those of new candidates."""
    from ray.tune.search import Searcher

    class SegmentSearcher(Searcher):
        def __init__(self) -> None:
            super().__init__(metric=sweep.tune.metric, mode=sweep.tune.mode)
            self.segments: dict[str, tuple[TrialKey, int]] = {}  # tune trial id -> segment
            self.optuna = _OptunaCells(sweep, progress, values) if sweep.tune.search == "optuna" else None

        def suggest(self, trial_id: str) -> dict | str | None:
            ready = progress.next_segments()
            if not ready:
                return Searcher.FINISHED if progress.finished() else None
            key, stop = ready[0]
            if key.candidate not in values:
                values[key.candidate] = (
                    self.optuna.ask(key.candidate) if self.optuna else sample_values(sweep, *key.candidate)
                )
            progress.running.add(key)
            self.segments[trial_id] = (key, stop)
            return {
                **sweep.cells[key.cell].values,
                **values[key.candidate],
                "seed": trial_seed(sweep, key.sample, key.rep),
                TRIAL_KEY: key.name,
                STOP_KEY: stop,
            }

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id not in self.segments:
                return
            key, stop = self.segments.pop(trial_id)
            progress.running.discard(key)
            epoch = int(result.get("epoch", 0)) if result else 0
            if error or not result or sweep.tune.metric not in result:
                progress.failed[key] = "errored" if error else "ended without a result"
                return
            progress.record(key, epoch, float(result[sweep.tune.metric]))
            if epoch < stop:  # a scheduler (Tune's ASHA) stopped it early
                progress.stopped.add(key)
            if self.optuna:
                self.optuna.tell_finished()

        def save(self, checkpoint_path: str) -> None:
            # Tune saves searchers with its experiment state; kn_dist resumes from the trials' own records
            # instead (kn_dist.sweep_progress), so this is for Tune's bookkeeping only.
            with open(checkpoint_path, "wb") as f:
                pickle.dump({"segments": self.segments}, f)

        def restore(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "rb") as f:
                self.segments = pickle.load(f)["segments"]

    return SegmentSearcher()


class _OptunaCells:
    """One Optuna TPE study per cell, rebuilt from the candidates already judged, asked and told directly."""

    def __init__(self, sweep: Sweep, progress: SweepProgress, values: dict[tuple[int, int], dict[str, Any]]):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.sweep, self.progress, self.values = sweep, progress, values
        self.studies: dict[int, Any] = {}
        self.asked: dict[tuple[int, int], Any] = {}
        self.told: set[tuple[int, int]] = set()
        self.tell_finished()

    def _study(self, cell: int) -> tuple[Any, dict[str, Any]]:
        import numpy as np
        import optuna

        space = self.sweep.cells[cell].space
        dists = {key: _distribution(spec) for key, spec in space.items()}
        if cell not in self.studies:
            # Seeded by how many of the cell's candidates are drawn already: a later pass of the sweep does
            # not draw the earlier passes' values again.
            drawn = sum(1 for c in self.values if c[0] == cell)
            seed = int(np.random.SeedSequence([self.sweep.tune.search_seed, cell, drawn]).generate_state(1)[0])
            sampler = optuna.samplers.TPESampler(seed=seed)
            direction = "maximize" if self.sweep.tune.mode == "max" else "minimize"
            self.studies[cell] = optuna.create_study(sampler=sampler, direction=direction)
        return self.studies[cell], dists

    def ask(self, candidate: tuple[int, int]) -> dict[str, Any]:
        study, dists = self._study(candidate[0])
        trial = study.ask(dists)
        self.asked[candidate] = trial
        return dict(trial.params)

    def _final_score(self, candidate: tuple[int, int]) -> float | None:
        """The candidate's mean metric at the last epoch all its replicates reached, once none trains further."""
        trials = self.progress.trials(candidate)
        done = self.progress.stopped_trials() | {
            t for t in trials if self.progress.max_t in self.progress.scores.get(t, {})
        }
        if not all(t in done for t in trials) or not all(self.progress.scores.get(t) for t in trials):
            return None
        last = min(max(self.progress.scores[t]) for t in trials)
        return self.progress.score(candidate, last)

    def tell_finished(self) -> None:
        """Give each cell's study the score of every candidate that trains no further (asked here, or drawn
        in an earlier pass of the sweep and read back from its runs), once."""
        import optuna

        for candidate in [c for c in self.values if c not in self.told]:
            score = self._final_score(candidate)
            if score is None:
                continue
            study, dists = self._study(candidate[0])
            if candidate in self.asked:
                study.tell(self.asked.pop(candidate), score)
            else:
                params = self.values[candidate]
                study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=score))
            self.told.add(candidate)


def _distribution(spec: Any) -> Any:
    import optuna.distributions as d

    if spec.form == "choice":
        return d.CategoricalDistribution(spec.choice)
    lo, hi = getattr(spec, spec.form)
    if spec.form == "randint":
        return d.IntDistribution(lo, hi)
    return d.FloatDistribution(lo, hi, log=spec.form == "loguniform")
