"""Which trial segments of a sweep run next: synchronous successive halving per cell, from recorded scores.

A sweep trains *trials*, each a (cell, sample, replicate) of kn_dist.sweep. A *candidate* is a (cell,
sample): one sampled configuration, whose replicates (tune.seeds) are judged together by their mean. A
*segment* trains one trial up to a stop epoch; its next segment resumes from the trial's own checkpoint.

Rungs are grace_period x reduction_factor^k epochs below the budget (max_t = epochs), then max_t.
Scheduler `halving`: once every live candidate of a cell (model/norm) has its score at a rung, the cell
keeps its best max(1, floor(n / reduction_factor)) candidates (ties: the earlier sample) and stops the
others. The counts depend on n alone, so every cell ends with the same number of full-budget candidates
however the trials interleave (Ray's asynchronous ASHA ranks whatever arrived first, across all cells).
A cell down to one candidate trains it straight to max_t. `fifo` and `asha`: one segment per trial,
straight to max_t (Tune's ASHA may stop a trial early; that is recorded here, not decided).

The state is rebuilt from what trials recorded (kn_dist.tune reads their MLflow histories), so a killed
sweep continues where its records end: no decision rests on Tune's own saved state.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from kn_dist.sweep import Sweep, replicates


@dataclass(frozen=True, order=True)
class TrialKey:
    """One trial of a sweep: (cell index, sample index, replicate index)."""

    cell: int
    sample: int
    rep: int

    @property
    def name(self) -> str:
        return f"c{self.cell}s{self.sample}r{self.rep}"

    @property
    def candidate(self) -> tuple[int, int]:
        return (self.cell, self.sample)

    @classmethod
    def parse(cls, name: str) -> TrialKey:
        match = re.fullmatch(r"c(\d+)s(\d+)r(\d+)", name)
        if match is None:
            raise ValueError(f"{name!r} is not a trial key (c<cell>s<sample>r<rep>)")
        return cls(*(int(g) for g in match.groups()))


def rung_epochs(sweep: Sweep) -> list[int]:
    """The epochs at which `halving` judges a cell: grace x rf^k below max_t, then max_t (one rung otherwise)."""
    max_t, sched = sweep.base.epochs, sweep.tune.scheduler
    if sched.name != "halving":
        return [max_t]
    rungs, k = [], 0
    while (epoch := round(sched.grace_period * sched.reduction_factor**k)) < max_t:
        if not rungs or epoch > rungs[-1]:
            rungs.append(epoch)
        k += 1
    return [*rungs, max_t]


def survivors(alive: int, reduction_factor: float) -> int:
    """Candidates a cell keeps at a rung: floor(alive / reduction_factor), at least one."""
    return max(1, math.floor(alive / reduction_factor))


def full_budget_count(sweep: Sweep) -> int | None:
    """Candidates per cell that train to max_t: fixed by construction for `halving` and `fifo`; None for asha."""
    sched = sweep.tune.scheduler
    if sched.name == "asha":
        return None
    alive = candidates_per_cell(sweep)
    for _ in rung_epochs(sweep)[:-1]:
        if alive == 1:
            break
        alive = survivors(alive, sched.reduction_factor)
    return alive


def candidates_per_cell(sweep: Sweep) -> int:
    """Sampled configurations per model/norm cell: num_samples per grid combination."""
    labels = [c.label for c in sweep.cells]
    return sweep.tune.num_samples * labels.count(labels[0])


@dataclass
class SweepProgress:
    """The recorded state of a sweep's trials and the segments that follow from it."""

    sweep: Sweep
    scores: dict[TrialKey, dict[int, float]] = field(default_factory=dict)  # trial -> epoch -> metric
    stopped: set[TrialKey] = field(default_factory=set)  # stopped by Tune's ASHA before max_t
    failed: dict[TrialKey, str] = field(default_factory=dict)  # trial -> why (this pass)
    running: set[TrialKey] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rungs = rung_epochs(self.sweep)
        self.max_t = self.sweep.base.epochs
        self.reps = replicates(self.sweep)
        self.maximize = self.sweep.tune.mode == "max"
        self.cells: dict[str, list[tuple[int, int]]] = {}  # label -> candidates, sample-major
        for sample in range(self.sweep.tune.num_samples):
            for index, cell in enumerate(self.sweep.cells):
                self.cells.setdefault(cell.label, []).append((index, sample))

    # -- recording ------------------------------------------------------------------------------------

    def record(self, key: TrialKey, epoch: int, value: float) -> None:
        self.scores.setdefault(key, {})[epoch] = value

    def trials(self, candidate: tuple[int, int]) -> list[TrialKey]:
        return [TrialKey(*candidate, rep) for rep in range(self.reps)]

    def score(self, candidate: tuple[int, int], epoch: int) -> float | None:
        """Mean over the candidate's replicates of the metric at `epoch`, or None while one is missing."""
        values = [self.scores.get(t, {}).get(epoch) for t in self.trials(candidate)]
        return None if None in values else math.fsum(values) / len(values)

    # -- decisions ------------------------------------------------------------------------------------

    def _ranked(self, candidates: list[tuple[int, int]], epoch: int) -> list[tuple[int, int]]:
        """Best first by the mean score at `epoch`; ties keep sample-major order (the earlier sample wins)."""
        order = {c: i for i, c in enumerate(candidates)}
        sign = -1.0 if self.maximize else 1.0
        return sorted(candidates, key=lambda c: (sign * self.score(c, epoch), order[c]))

    def _walk(self, label: str) -> tuple[list[tuple[int, int]], int, list[TrialKey]]:
        """(live candidates, the epoch they are judged at next, trials that still lack that epoch's score)."""
        alive = list(self.cells[label])
        for rung in self.rungs:
            target = self.max_t if len(alive) == 1 else rung
            need = [
                t
                for c in alive
                for t in self.trials(c)
                if target not in self.scores.get(t, {}) and t not in self.stopped
            ]
            if need or target == self.max_t:
                return alive, target, need
            alive = self._ranked(alive, rung)[: survivors(len(alive), self.sweep.tune.scheduler.reduction_factor)]
        raise AssertionError("the last rung is max_t")

    def next_segments(self) -> list[tuple[TrialKey, int]]:
        """(trial, stop epoch) of every segment that may start now: promotions first, then sample-major."""
        ready = []
        for label in self.cells:
            _, target, need = self._walk(label)
            ready += [(t, target) for t in need if t not in self.running and t not in self.failed]
        return sorted(ready, key=lambda s: (-s[1], s[0].sample, s[0].cell, s[0].rep))

    def finished(self) -> bool:
        """Nothing runs and nothing can start: every cell is done, or blocked by a failed trial."""
        return not self.running and not self.next_segments()

    def full_budget(self, label: str) -> list[tuple[int, int]]:
        """The cell's candidates whose every replicate reached max_t."""
        return [c for c in self.cells[label] if all(self.max_t in self.scores.get(t, {}) for t in self.trials(c))]

    def stopped_trials(self) -> set[TrialKey]:
        """Trials that will train no further: not among their cell's live candidates, or stopped by ASHA."""
        out = set(self.stopped)
        for label, candidates in self.cells.items():
            alive, _, _ = self._walk(label)
            out |= {t for c in candidates if c not in alive for t in self.trials(c)}
        return out
