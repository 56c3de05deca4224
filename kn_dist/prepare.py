"""Resolve and check a config on the driver, before any Ray process starts (no Ray import here).

Everything a person can get wrong — model, norm, KernelNorm geometry, dataset files and labels,
data that cannot be sharded over the workers, tracking URI — is found here and raised as a one-line
UserError. `kn-dist train`, `kn-dist tune` and `kn-dist study` all call `prepare_config`; the
workers receive the resolved config (absolute paths: Ray Train changes the workers' directory).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from kn_dist import tracking
from kn_dist.config import ExperimentConfig
from kn_dist.errors import UserError
from kn_dist.models import check_geometry, create_model, model_info
from kn_dist.runtime import is_local_address


def _is_uri(path: str) -> bool:
    return "://" in path


def num_classes_of(dataset: str) -> int:
    """The head size a dataset implies (imagefolder: unknown before its files are read, 10 for geometry checks)."""
    from kn_dist.data import dataset_info

    return dataset_info(dataset)["num_classes"] or 10


def model_build_error(cfg: ExperimentConfig, num_classes: int) -> str | None:
    """None if cfg's model builds and takes a (1, 3, S, S) input, else one line saying why not.

    Only ValueError counts as "cannot be built": the models and layers raise it for bad arguments and
    impossible geometry (the registry's meta-device trace turns a layer's shape failure into one). Any
    other exception is a bug in kn_dist and keeps its traceback (issue 14, item 12).
    """
    build = functools.partial(create_model, cfg.model.name, cfg.model.norm, num_classes, **cfg.model.kwargs)
    try:
        try:
            check_geometry(build, cfg.data.image_size, cfg.model.name)  # meta device: no memory, no init
        except NotImplementedError:  # an op without a meta kernel: one real forward instead
            with torch.no_grad():
                build().eval()(torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size))
    except ValueError as err:
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def prepare_config(cfg: ExperimentConfig, *, address: str | None = None) -> ExperimentConfig:
    """The resolved config: everything checked, defaults filled in, paths absolute. Idempotent.

    Resolves model.norm (None -> the published norm), model.num_classes (None -> the dataset's),
    the .beton paths (digits is written on first use), checkpoint.storage_path and tracking.uri.
    `address` is the Ray cluster the run will use (None: a local Ray), for the GPU check.
    """
    cfg = cfg.model_copy(deep=True)
    try:
        info = model_info(cfg.model.name)
    except ValueError as err:
        raise UserError(str(err)) from None
    norm = cfg.model.norm or info.default_norm
    if norm not in info.norms:
        raise UserError(
            f"model {cfg.model.name!r} does not support norm {norm!r}; valid norms are: {', '.join(info.norms)}"
        )

    # Dataset: files exist (digits is written here on first use), labels fit the head, resolution fits.
    from kn_dist import data

    # world_size: a batch larger than a rank's shard, cutout larger than the image, fewer val samples than
    # workers would each fail only inside the workers, retried max_failures times (issue 14, item 11).
    found = data.check_dataset(cfg.data, num_classes=cfg.model.num_classes, world_size=cfg.scaling.num_workers)
    cfg.data.train_path, cfg.data.val_path, cfg.data.test_path = (
        found["train_path"],
        found["val_path"],
        found["test_path"],
    )
    if not _is_uri(cfg.data.root):
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    cfg.model.norm, cfg.model.num_classes = norm, found["num_classes"]

    # Every side the model will see: image_size, and for imagefolder each progressive-resizing and eval side.
    from kn_dist.data.imagenet_pipeline import resolutions

    sides = resolutions(cfg.data, cfg.epochs) if cfg.data.dataset == "imagefolder" else []
    for side in [cfg.data.image_size, *(s for s in sides if s != cfg.data.image_size)]:
        sized = cfg.model_copy(update={"data": cfg.data.model_copy(update={"image_size": side})})
        error = model_build_error(sized, cfg.model.num_classes)
        if error:
            raise UserError(
                f"model {cfg.model.name!r} (norm {norm!r}, kwargs {cfg.model.kwargs}) cannot be built for "
                f"{side}x{side} inputs: {error}"
            )
    if cfg.scaling.global_batch_size is not None:
        from kn_dist.data.global_batch import check_global_batch

        check_global_batch(cfg.scaling.global_batch_size, found["train_size"])

    if not _is_uri(cfg.checkpoint.storage_path):
        cfg.checkpoint.storage_path = str(Path(cfg.checkpoint.storage_path).expanduser().resolve())
    cfg.tracking.uri = tracking.resolve_uri(cfg.tracking.uri)
    # A cluster may have GPUs this machine lacks; only a purely local run can be judged here.
    if cfg.scaling.use_gpu and not torch.cuda.is_available() and is_local_address(address):
        raise UserError("scaling.use_gpu=true but this machine has no CUDA device; set scaling.use_gpu=false")
    return ExperimentConfig.model_validate(cfg.model_dump())
