"""A run's checkpoint folders, kept by kn_dist itself: <storage_path>/<run name>/epoch_NNNN/state.pt.

Ray Train writes this layout for multi-worker runs (kn_dist.worker names the folders). The runs whose
loop is not under a TorchTrainer write the same folders here: one-worker runs in the driver's process
(kn_dist.in_process) and one-worker Tune trials (kn_dist.tune), whose checkpoints must outlive the Tune
trial that wrote them: a sweep trial continues in a later segment, a study's final in a later pass. The
storage is a local folder (atomic: copy, then rename) or a URI pyarrow can write (s3://, gs://; the
folder counts once its state.pt exists, which object stores make visible whole).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kn_dist.errors import UserError
from kn_dist.worker import CHECKPOINT_FILE, checkpoint_epoch


def _is_uri(path: str) -> bool:
    return "://" in path


def checkpoint_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """(epoch, folder) of every complete kn_dist checkpoint under a local `run_dir`, oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for folder in run_dir.iterdir():
        epoch = checkpoint_epoch(folder.name)
        if epoch is not None and (folder / CHECKPOINT_FILE).is_file():
            found.append((epoch, folder))
    return sorted(found)


def _remote_folders(storage_path: str, name: str) -> list[tuple[int, str]]:
    """(epoch, path) of every complete checkpoint of run `name` under a URI, oldest first."""
    import pyarrow.fs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        run_dir = f"{root.rstrip('/')}/{name}"
        if fs.get_file_info(run_dir).type == pyarrow.fs.FileType.NotFound:
            return []
        entries = fs.get_file_info(pyarrow.fs.FileSelector(run_dir, recursive=False))
        folders = {
            e.base_name: e.path
            for e in entries
            if e.type == pyarrow.fs.FileType.Directory and checkpoint_epoch(e.base_name) is not None
        }
        files = fs.get_file_info([f"{path}/{CHECKPOINT_FILE}" for path in folders.values()])
    except (OSError, pyarrow.ArrowException) as err:
        raise UserError(f"checkpoint.storage_path {storage_path!r} cannot be read: {err}") from None
    complete = [base for base, f in zip(folders, files, strict=True) if f.type == pyarrow.fs.FileType.File]
    return sorted((checkpoint_epoch(base), f"{storage_path.rstrip('/')}/{name}/{base}") for base in complete)


def latest_checkpoint(storage_path: str, name: str) -> str | None:
    """The newest kn_dist checkpoint folder of run `name` under `storage_path` (local, NFS, s3://, gs://).

    Looks for our own files (`<name>/epoch_NNNN/state.pt`), not for Ray Train's bookkeeping, so a renamed
    Ray file cannot make an existing run look new.
    """
    if _is_uri(storage_path):
        found = _remote_folders(storage_path, name)
        return found[-1][1] if found else None
    local = checkpoint_folders(Path(storage_path) / name)
    return str(local[-1][1]) if local else None


def save_checkpoint(storage_path: str, name: str, source: str, dir_name: str, keep: int) -> str:
    """Copy checkpoint folder `source` to <storage_path>/<name>/<dir_name>, keep the newest `keep`; its path."""
    if _is_uri(storage_path):
        return _save_remote(storage_path, name, source, dir_name, keep)
    run_dir = Path(storage_path) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    # Copy, then rename: a run killed mid-copy leaves a hidden temporary folder, never a half checkpoint.
    final, partial = run_dir / dir_name, run_dir / f".{dir_name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    if final.exists():  # the same epoch checkpointed again after a restart
        shutil.rmtree(final)
    os.replace(partial, final)
    for _, old in checkpoint_folders(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return str(final)


def _save_remote(storage_path: str, name: str, source: str, dir_name: str, keep: int) -> str:
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    target = f"{root.rstrip('/')}/{name}/{dir_name}"
    fs.create_dir(target, recursive=True)
    # state.pt last: the folder counts as a checkpoint only once it is there (_remote_folders).
    others = [p for p in Path(source).iterdir() if p.name != CHECKPOINT_FILE]
    for path in [*others, Path(source) / CHECKPOINT_FILE]:
        pyarrow.fs.copy_files(str(path), f"{target}/{path.name}", destination_filesystem=fs)
    for _, old in _remote_folders(storage_path, name)[:-keep]:
        fs.delete_dir(pyarrow.fs.FileSystem.from_uri(old)[1])
    return f"{storage_path.rstrip('/')}/{name}/{dir_name}"
