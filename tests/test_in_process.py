"""kn_dist.in_process's checkpoint folders, without training: what Ray Train's CheckpointConfig(num_to_keep)
does for one worker, checked on the files. Whole in-process runs are tests/test_trainer.py's and
tests/test_fault_tolerance.py's."""

from __future__ import annotations

from pathlib import Path

import torch

from kn_dist.in_process import LocalSession, checkpoint_folders
from kn_dist.worker import CHECKPOINT_FILE, checkpoint_epoch


def _report_epoch(session: LocalSession, tmp: Path, epoch: int) -> None:
    staged = tmp / f"staged_{epoch}"
    staged.mkdir()
    torch.save({"epoch": epoch}, staged / CHECKPOINT_FILE)
    session.report({"epoch": epoch}, str(staged), f"epoch_{epoch:04d}")


def test_keeps_the_newest_checkpoints_and_resumes_from_the_last(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    session = LocalSession(run_dir, keep=2, use_gpu=False)
    assert session.latest_checkpoint() is None
    for epoch in range(1, 5):
        _report_epoch(session, tmp_path, epoch)
    session.report({"epoch": 5}, None, None)  # an epoch without a checkpoint
    assert sorted(p.name for p in run_dir.iterdir()) == ["epoch_0003", "epoch_0004"]
    latest = session.latest_checkpoint()
    with latest.as_directory() as folder:
        assert torch.load(Path(folder) / CHECKPOINT_FILE)["epoch"] == 4
    assert session.metrics == {"epoch": 5} and session.checkpoint == latest


def test_incomplete_and_foreign_folders_are_not_checkpoints(tmp_path):
    run_dir = tmp_path / "r"
    (run_dir / "epoch_0007").mkdir(parents=True)  # no state.pt: a copy that never finished
    (run_dir / ".epoch_0008.partial").mkdir()
    (run_dir / "checkpoint_000001").mkdir()
    torch.save({}, run_dir / "checkpoint_000001" / CHECKPOINT_FILE)
    assert checkpoint_folders(run_dir) == []
    (run_dir / "epoch_0002").mkdir()
    torch.save({}, run_dir / "epoch_0002" / CHECKPOINT_FILE)
    assert checkpoint_folders(run_dir) == [(2, run_dir / "epoch_0002")]


def test_checkpoint_epoch_reads_local_paths_and_uris():
    assert checkpoint_epoch("/x/run/epoch_0012") == 12
    assert checkpoint_epoch("s3://bucket/run/epoch_0003/") == 3
    assert checkpoint_epoch("/x/run/checkpoint_2024-01-01") is None
