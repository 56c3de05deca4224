"""Typed experiment configuration: one YAML file per run, overrides `a.b=value` on the command line.

Every section forbids unknown keys, so a typo is an error that names the key (STYLE.md habit 3).
`to_flat_dict` gives the `section.key` view that MLflow records as params.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kn_dist.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ProgressiveResizing(_Strict):
    """Training resolution per epoch (ffcv-imagenet's resolution schedule; imagefolder only): `min_res` up
    to epoch `start_ramp`, `max_res` from `end_ramp` on, linear in between rounded to a multiple of `step`.
    Epochs count from 0 here, as in ffcv-imagenet's configs (kn_dist's epoch e is their e - 1)."""

    min_res: int = Field(160, gt=0)
    max_res: int = Field(192, gt=0)
    start_ramp: int = Field(0, ge=0)
    end_ramp: int = Field(0, ge=0)
    step: int = Field(32, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> ProgressiveResizing:
        if self.min_res > self.max_res or self.start_ramp > self.end_ramp:
            raise ValueError(
                f"data.progressive needs min_res <= max_res and start_ramp <= end_ramp, got {self.min_res}, "
                f"{self.max_res} and {self.start_ramp}, {self.end_ramp}"
            )
        return self


class DataConfig(_Strict):
    """Where the .beton files are and how the FFCV loaders read them."""

    dataset: Literal["digits", "cifar10", "cifar100", "imagefolder", "synthetic"] = "digits"
    root: str = "data"  # the dataset lives in <root>/<dataset>/{train,val,test}.beton + splits.json
    train_path: str | None = None  # explicit .beton paths override root/dataset
    val_path: str | None = None  # held out from the training data: what sweeps score on
    test_path: str | None = None  # the dataset's test split: opened only by final runs; optional with explicit paths
    source_dir: str | None = None  # imagefolder: the class-folder tree to write from
    # imagefolder without its own val/ folder: the stratified share of train/ held out as val (recorded
    # in splits.json; a directory written with another fraction is refused, not silently reused)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    image_size: int = Field(32, gt=0)  # resolution the model sees
    batch_size: int = Field(128, gt=0)  # per Ray worker
    val_batch_size: int | None = Field(None, gt=0)  # default: batch_size
    normalization: Literal["mean_std", "unit"] = "mean_std"  # unit = x/255 only, as the KernelNorm paper
    crop_padding: int = Field(4, ge=0)  # random-crop padding (translate) for training; 0 turns it off
    hflip: bool = True
    cutout: int = Field(0, ge=0)  # cutout square side; 0 turns it off
    # Strong augmentation of the published recipes (kn_dist.data.strong_augment), off by default; seeded per
    # (seed, epoch, sample) like crop / flip / cutout. Order: crop, flip, cutout, RandAugment or AutoAugment,
    # colour jitter, normalisation, random erasing (locuslab/convmixer-cifar10's train.py order).
    randaugment_ops: int = Field(0, ge=0, le=4)  # torchvision RandAugment num_ops; 0 turns it off
    randaugment_magnitude: int = Field(9, ge=0)  # magnitude bin, below randaugment_bins
    randaugment_bins: int = Field(31, ge=2)  # torchvision's num_magnitude_bins
    autoaugment: Literal["none", "cifar10"] = "none"  # torchvision AutoAugment policy (CIFAR-10: Cubuk et al. 2019)
    color_jitter: float = Field(0.0, ge=0, le=0.5)  # ColorJitter(j, j, j): factors uniform in [1 - j, 1 + j]
    random_erasing: float = Field(0.0, ge=0, le=1)  # RandomErasing probability (value 0 after normalisation)
    random_erasing_scale: tuple[float, float] = (0.02, 0.33)  # erased share of the image (torchvision defaults)
    random_erasing_ratio: tuple[float, float] = (0.3, 3.3)  # aspect ratio range, sampled log-uniformly
    repeated_augmentation: int = Field(1, ge=1)  # passes over train per epoch, fresh draws each (Lee et al.'s --ra)
    num_workers: int | None = Field(None, ge=1)  # loader threads; default: the CPUs given to each Ray worker
    order: Literal["random", "quasi_random"] = "random"
    os_cache: bool = True
    batches_ahead: int = Field(3, ge=1)
    # ImageNet-style data (imagefolder; kn_dist.data.imagenet_pipeline): training crops are seeded
    # RandomResizedCrops; evaluation is a centre crop of val_crop_ratio x the short side resized to
    # val_image_size (default image_size); 224/256 = torchvision's Resize(256) + CenterCrop(224).
    val_image_size: int | None = Field(None, gt=0)
    val_crop_ratio: float = Field(224 / 256, gt=0, le=1)
    progressive: ProgressiveResizing | None = None  # training resolution per epoch; None: image_size throughout
    tta_flip: bool = False  # evaluate on the mean logits of each image and its mirror (ffcv-imagenet's lr_tta)

    # the loaders' GPU branch (uint8 to the device, converted and normalised there): "auto" on CUDA; "on" also
    # on a CPU (to check it there), "off" never
    device_pipeline: Literal["auto", "on", "off"] = "auto"

    @model_validator(mode="after")
    def _augmentation(self) -> DataConfig:
        if self.randaugment_magnitude >= self.randaugment_bins:
            raise ValueError(
                f"data.randaugment_magnitude {self.randaugment_magnitude} must be below data.randaugment_bins "
                f"({self.randaugment_bins})"
            )
        if self.randaugment_ops and self.autoaugment != "none":
            raise ValueError("data.randaugment_ops and data.autoaugment are alternatives: set one of them to off")
        low, high = self.random_erasing_scale
        if not 0 < low <= high < 1:
            raise ValueError(f"data.random_erasing_scale {[low, high]} must satisfy 0 < low <= high < 1")
        low, high = self.random_erasing_ratio
        if not 0 < low <= high:
            raise ValueError(f"data.random_erasing_ratio {[low, high]} must satisfy 0 < low <= high")
        return self


class ModelConfig(_Strict):
    name: str = "resnet18_cifar"
    norm: str | None = None  # None: the normalisation the architecture was published with
    num_classes: int | None = Field(None, gt=1)  # None: the dataset's number of classes
    kwargs: dict[str, Any] = Field(default_factory=dict)  # entrypoint arguments, e.g. KernelNorm kernel/dropout


class OptimConfig(_Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)  # for the global batch (batch_size x num_workers); not rescaled
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(5e-4, ge=0)  # applied to parameters with ndim >= 2 only
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)  # max global grad norm
    # mixup / cutmix per batch (kn_dist.mix; torchvision v2.MixUp / v2.CutMix pairing), timm-style switch:
    # with both alphas > 0 a mixed batch is cutmix with probability mix_switch_prob, else mixup.
    mixup_alpha: float = Field(0.0, ge=0)  # Beta(alpha, alpha) mixing weight; 0 turns mixup off
    cutmix_alpha: float = Field(0.0, ge=0)  # Beta(alpha, alpha) kept area; 0 turns cutmix off
    mix_prob: float = Field(1.0, ge=0, le=1)  # share of batches mixed at all
    mix_switch_prob: float = Field(0.5, ge=0, le=1)
    # EMA of the weights after every optimizer step (kn_dist.ema; timm ModelEmaV3's formula, no warm-up);
    # validation and test then evaluate the EMA model (ConvNeXt's --model_ema_eval). None turns it off.
    ema_decay: float | None = Field(None, gt=0, lt=1)


class ScheduleConfig(_Strict):
    # linear: warm-up, then a straight line to min_lr at the end (ffcv-imagenet's "cyclic" schedule)
    name: Literal["cosine", "onecycle", "multistep", "constant", "linear"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    milestones: list[int] = Field(default_factory=list)  # multistep, in epochs
    gamma: float = Field(0.1, gt=0)  # multistep factor
    min_lr: float = Field(0.0, ge=0)


class ScalingConfig(_Strict):
    """How many Ray workers train one run and what each holds. DDP semantics (DESIGN.md §9): `batch_size`
    is per worker, so the global batch is batch_size x num_workers (logged as derived.global_batch_size)
    and the lr is for that global batch. BatchNorm normalises each worker's own batch unless `sync_bn`."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)  # only with use_gpu
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # SyncBatchNorm over all workers: BN statistics of the global batch, so a recipe scaled to more
    # workers keeps its BN batch. Off by default: the published recipes are single-GPU (experiments/README.md).
    sync_bn: bool = False
    # The batch of one optimizer step, kept on any world size by gradient accumulation
    # (kn_dist.data.global_batch): batch_size stays per worker, accumulation = global / (batch_size x workers).
    # None: batch_size x num_workers, no accumulation.
    global_batch_size: int | None = Field(None, gt=0)
    # Elastic: Ray Train starts (and after a lost node restarts) the run on as many workers as the cluster
    # holds, between min_workers and num_workers; needs global_batch_size. None: always num_workers.
    min_workers: int | None = Field(None, ge=1)
    # A one-worker `kn-dist train` on this machine (local Ray, local storage) runs its loop in the kn-dist
    # process itself, without Ray (kn_dist.in_process): same checkpoints and MLflow records, ~30 s less
    # start-up. false: always under Ray Train (a worker actor; e.g. to exercise NCCL on one GPU).
    in_process: bool = True
    # DDP (and SyncBN with sync_bn) also at one worker: the GPU check exercises DDP's reducer, DDP + compile
    # and NCCL on one GPU this way. Needs a process group: under Ray Train (in_process=false).
    force_ddp: bool = False


class CheckpointConfig(_Strict):
    storage_path: str = "runs"  # local dir, or s3:// / gs:// / shared NFS on multi-node clusters
    every_epochs: int = Field(1, ge=1)
    keep: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1)  # -1: retry forever


class TrackingConfig(_Strict):
    uri: str | None = None  # None: sqlite:///<cwd>/mlflow.db
    experiment: str = "kn_dist"


class ExperimentConfig(_Strict):
    """One training run. `name` identifies it in storage: the same name resumes (Ray Train V2)."""

    # A directory name under checkpoint.storage_path: stable, no timestamps (DESIGN.md §7).
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$", max_length=200)
    seed: int = 0
    epochs: int = Field(10, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        """Checks that span sections; each message names the keys involved."""
        bad = [m for m in self.schedule.milestones if not 1 <= m <= self.epochs]
        if bad:
            raise ValueError(f"schedule.milestones {bad} must lie within 1..epochs ({self.epochs})")
        if self.schedule.warmup_epochs > self.epochs:
            raise ValueError(f"schedule.warmup_epochs {self.schedule.warmup_epochs} exceeds epochs ({self.epochs})")
        if self.schedule.min_lr >= self.optim.lr:
            raise ValueError(f"schedule.min_lr {self.schedule.min_lr} must be below optim.lr {self.optim.lr}")
        if self.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError("precision fp16 needs scaling.use_gpu=true; on CPU use precision=bf16")
        self._check_imagenet_options()
        self._check_global_batch()
        _check_scaling(self.scaling)
        return self

    def _check_imagenet_options(self) -> None:
        data = self.data
        if data.progressive is not None and data.dataset != "imagefolder":
            raise ValueError(f"data.progressive resizes imagefolder crops; dataset {data.dataset!r} has a fixed size")
        if data.progressive is not None and data.cutout >= data.progressive.min_res:
            raise ValueError(f"data.cutout {data.cutout} must be smaller than data.progressive.min_res")

    def _check_global_batch(self) -> None:
        scaling, batch = self.scaling, self.data.batch_size
        if scaling.min_workers is not None and scaling.min_workers > scaling.num_workers:
            raise ValueError(f"scaling.min_workers {scaling.min_workers} exceeds scaling.num_workers")
        if scaling.min_workers is not None and scaling.global_batch_size is None:
            raise ValueError("scaling.min_workers (elastic) needs scaling.global_batch_size: the batch to keep")
        if scaling.global_batch_size is None:
            return
        if self.data.order == "quasi_random":
            raise ValueError("scaling.global_batch_size orders samples itself; set data.order=random")
        for workers in {scaling.num_workers, scaling.min_workers or scaling.num_workers}:
            if scaling.global_batch_size % (batch * workers):
                raise ValueError(
                    f"scaling.global_batch_size {scaling.global_batch_size} must be a multiple of data.batch_size "
                    f"{batch} x {workers} workers = {batch * workers} (the rest is gradient accumulation)"
                )


def _check_scaling(s: ScalingConfig) -> None:
    """Worker layouts that cannot run, refused at config time (issue 24) rather than deep inside torch or NCCL."""
    if s.sync_bn and not s.use_gpu:
        raise ValueError(
            "scaling.sync_bn=true needs GPUs (torch's SyncBatchNorm runs on CUDA only); set scaling.use_gpu=true "
            "or scaling.sync_bn=false"
        )
    if s.use_gpu and s.gpus_per_worker == 0:
        raise ValueError("scaling.use_gpu=true with scaling.gpus_per_worker=0 gives the workers no GPU; set it > 0")
    if s.use_gpu and s.num_workers > 1 and s.gpus_per_worker < 1 and s.placement_strategy in ("PACK", "STRICT_PACK"):
        raise ValueError(
            f"scaling.gpus_per_worker={s.gpus_per_worker} with num_workers={s.num_workers} and placement "
            f"{s.placement_strategy} packs several DDP ranks onto one GPU, which NCCL refuses; use gpus_per_worker=1"
        )
    if s.force_ddp and s.num_workers == 1 and s.in_process:
        raise ValueError(
            "scaling.force_ddp=true needs a process group, which a one-worker run in this process does not have; "
            "set scaling.in_process=false (one worker under Ray Train)"
        )


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    if not where or first["type"] == "value_error":  # a model validator's check: its message names the keys
        return f"config: {first['msg'].removeprefix('Value error, ')}"
    if first["type"] == "extra_forbidden":
        return f"unknown config key {where!r}; check the spelling against kn_dist/config.py"
    return f"config key {where!r}: {first['msg']} (got {first.get('input')!r})"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings (value parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.05)")
        key, text = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(text)
    return raw


def from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a nested dict; a bad key or value raises UserError naming it."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(_describe(err)) from None


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The mapping in YAML file `path`; a UserError naming the file when it is missing, invalid or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{what} {str(path)!r} is not valid YAML: {err}".splitlines()[0]) from None
    if not isinstance(raw, dict):
        raise UserError(f"{what} {str(path)!r} must hold a mapping of sections, not {type(raw).__name__}")
    return raw


def load(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (None: all defaults) and apply command-line overrides."""
    raw = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(raw, overrides or []))


def to_flat_dict(cfg: BaseModel, prefix: str = "") -> dict[str, Any]:
    """`{"optim.lr": 0.1, ...}`: the resolved config as MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in cfg:
        name = f"{prefix}{key}"
        if isinstance(value, BaseModel):
            flat.update(to_flat_dict(value, f"{name}."))
        elif isinstance(value, dict):
            flat.update({f"{name}.{k}": v for k, v in value.items()} or {name: "{}"})
        else:
            flat[name] = value
    return flat


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML that `load` accepts unchanged."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def is_kn(norm: str) -> bool:
    """KernelNorm variants are named "kn" or "kn_<variant>" by the model registry."""
    return norm == "kn" or norm.startswith("kn_")
