"""A one-worker `kn-dist train` in the driver's own process: no Ray, no worker group (issue 13, item 4).

A run with one worker on this machine gains nothing from Ray Train's controller and worker actor, but
it pays for them: ~20 s of start-up on 2 cores, plus Ray's own start and shutdown. Here
kn_dist.worker.train_loop runs in the process that prepared the config. `LocalSession` does for it what
Ray Train does for one worker:
- checkpoints go to <storage_path>/<name>/epoch_NNNN/state.pt, the same folders and file that Ray Train
  writes, so either way of running resumes the other's checkpoints; the newest `checkpoint.keep` stay;
- after a failure the loop restarts from the last checkpoint, up to `checkpoint.max_failures` times;
- torch uses `cpus_per_worker` threads, as a Ray worker's OMP_NUM_THREADS makes it do.
MLflow is written by the same loop code, so the records are the same whichever way a run ran.
`scaling.in_process: false` keeps one-worker runs under Ray Train (e.g. to exercise NCCL on one GPU).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kn_dist.checkpoint_store import checkpoint_folders, save_checkpoint
from kn_dist.runtime import say
from kn_dist.worker import LoopConfig, train_loop


@dataclass(frozen=True)
class FolderCheckpoint:
    """A checkpoint folder on this machine; the part of ray.train.Checkpoint that the loop uses."""

    path: str

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        yield self.path


@dataclass
class InProcessResult:
    """What `fit_in_process` returns: the fields of ray.train.Result that kn_dist's callers read."""

    metrics: dict[str, Any]
    checkpoint: FolderCheckpoint | None
    path: str


class LocalSession:
    """kn_dist.worker's Session for one worker in this process: checkpoints are folders under `run_dir`."""

    world_rank, world_size = 0, 1
    in_driver = True  # the loop shares the driver's start-up timeline (kn_dist.runtime.mark)

    def __init__(self, run_dir: Path, keep: int, use_gpu: bool) -> None:
        self.run_dir, self.keep = run_dir, keep
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.node_id = f"local:{socket.gethostname()}"  # no Ray node: this machine
        self.metrics: dict[str, Any] = {}
        self.checkpoint: FolderCheckpoint | None = None

    def latest_checkpoint(self) -> FolderCheckpoint | None:
        folders = checkpoint_folders(self.run_dir)
        return FolderCheckpoint(str(folders[-1][1])) if folders else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, dir_name: str | None) -> None:
        self.metrics = dict(metrics)
        if checkpoint_dir:
            saved = save_checkpoint(str(self.run_dir.parent), self.run_dir.name, checkpoint_dir, dir_name, self.keep)
            self.checkpoint = FolderCheckpoint(saved)


@contextlib.contextmanager
def _torch_settings(threads: int) -> Iterator[None]:
    """The worker's torch settings (threads; the loop may switch on deterministic algorithms), then back."""
    before = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])
        torch.backends.cudnn.benchmark = before[3]


def fit_in_process(loop: LoopConfig, run_dir: Path) -> InProcessResult:
    """Run `loop` (one worker) here, restarting from the last checkpoint after a failure as Ray Train would."""
    cfg = loop.config
    session = LocalSession(run_dir, cfg.checkpoint.keep, cfg.scaling.use_gpu)
    allowed, failures = cfg.checkpoint.max_failures, 0
    with _torch_settings(max(1, int(cfg.scaling.cpus_per_worker))):
        while True:
            try:
                train_loop(loop, session)
                break
            except Exception as err:
                if allowed != -1 and failures >= allowed:
                    raise
                failures += 1
                say(
                    f"the run failed ({type(err).__name__}: {err}); restarting from its last checkpoint "
                    f"(restart {failures} of {'unlimited' if allowed == -1 else allowed}, checkpoint.max_failures)"
                )
    return InProcessResult(session.metrics, session.checkpoint, str(run_dir))
