"""Dataset directories on disk: old two-file layouts, the split record, `kn-dist data inspect`, and the
driver-side checks that replace Ray tracebacks from inside the workers (issue 14 item 11).

The checks for workers are pure arithmetic on the sizes `check_dataset` returns, so their messages
are tested on given sizes; only the layout tests write files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kn_dist import cli
from kn_dist.config import DataConfig
from kn_dist.data import check_data_for_workers, inspect_dataset, resolve_beton_paths, train_shard_size, write_dataset
from kn_dist.data.sources import ArrayDataset
from kn_dist.data.writers import write_beton
from kn_dist.errors import UserError

SIZES = {"train_size": 1167, "val_size": 270, "test_size": 360}


def _old_layout(out: Path) -> None:
    """train.beton + val.beton without index field or splits.json, as kn_dist wrote them before."""
    images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    for name in ("train", "val"):
        write_beton(out / f"{name}.beton", ArrayDataset(images, np.arange(4) % 2))


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synthetic"
    write_dataset("synthetic", out, num_samples=50)
    return out


def test_old_layout_is_refused_where_kn_dist_cannot_rewrite_it(tmp_path, capsys):
    out = tmp_path / "cifar10"
    _old_layout(out)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path))
    with pytest.raises(UserError, match=r"older kn_dist without a held-out validation split.*data write cifar10"):
        resolve_beton_paths(cfg)
    capsys.readouterr()  # FFCV's progress bars from writing the old files
    assert cli.main(["data", "inspect", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its val.beton is the test set" in err


def test_old_layout_of_a_builtin_dataset_is_rewritten(tmp_path):
    out = tmp_path / "synthetic"
    _old_layout(out)
    cfg = DataConfig(dataset="synthetic", root=str(tmp_path))
    train, val, test = resolve_beton_paths(cfg)
    info = inspect_dataset(out)
    # synthetic default: 10,000 train, 2,000 val, 2,000 test; the 4-image old files are gone
    assert [info["splits"][s]["num_samples"] for s in ("train", "val", "test")] == [10_000, 2_000, 2_000]
    assert all(p.parent == out for p in (train, val, test))


def test_synthetic_splits_and_inspect_command(synthetic_dir, capsys):
    capsys.readouterr()
    assert cli.main(["data", "inspect", str(synthetic_dir)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {s: v["num_samples"] for s, v in shown["splits"].items()} == {"train": 50, "val": 10, "test": 10}
    assert shown["split_seed"] == 0 and shown["splits"]["val"]["source"] == shown["splits"]["train"]["source"]
    assert shown["splits"]["train"]["resolution"] == "32x32"
    record = json.loads((synthetic_dir / "splits.json").read_text())["splits"]
    for split in ("train", "val", "test"):  # the class balance shown is the one recorded
        counts = record[split]["class_counts"]
        assert shown["splits"][split]["per_class_min"] == min(c for c in counts if c)
        assert shown["splits"][split]["per_class_max"] == max(counts)


def test_tampered_split_files_are_refused(synthetic_dir, tmp_path):
    import shutil

    copy = tmp_path / "synthetic"
    shutil.copytree(synthetic_dir, copy)
    shutil.copy(copy / "train.beton", copy / "val.beton")  # val now holds the training samples
    with pytest.raises(UserError, match=r"val.beton' does not hold the val split recorded"):
        resolve_beton_paths(DataConfig(dataset="synthetic", root=str(tmp_path)))
    record = json.loads((copy / "splits.json").read_text())
    record["dataset"] = "cifar10"
    (copy / "splits.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"records dataset 'cifar10', not 'synthetic'"):
        write_dataset("synthetic", copy)


def test_explicit_paths_rules():
    with pytest.raises(UserError, match="set both data.train_path and data.val_path"):
        resolve_beton_paths(DataConfig(train_path="a.beton"))
    with pytest.raises(UserError, match="data.test_path needs data.train_path and data.val_path"):
        resolve_beton_paths(DataConfig(test_path="t.beton"))


# ------------------------------------------------------------------ checks for workers


def test_shard_sizes_follow_ffcv():
    assert train_shard_size(1167, 1, "random") == 1167
    assert train_shard_size(251, 2, "random") == 126  # DistributedSampler pads: ceil(251 / 2)
    assert train_shard_size(251, 2, "quasi_random") == 125  # our strided shards are cut to N // W


@pytest.mark.parametrize(
    ("update", "world", "sizes", "message"),
    [
        ({"batch_size": 128}, 10, SIZES, r"data.batch_size 128 is larger than the 117 training samples each of 10"),
        ({"batch_size": 128, "order": "quasi_random"}, 10, SIZES, r"at most 116 or use fewer workers"),
        ({"cutout": 32}, 1, SIZES, r"data.cutout 32 must be smaller than data.image_size 32.*1..31, or 0"),
        ({"crop_padding": 40}, 1, SIZES, r"data.crop_padding 40 must be smaller than data.image_size 32"),
        ({"batch_size": 1}, 300, SIZES, r"the val split has 270 samples, fewer than the 300 workers"),
        ({"batch_size": 1}, 8, {**SIZES, "test_size": 5}, r"the test split has 5 samples, fewer than the 8"),
    ],
)
def test_data_errors_are_caught_on_the_driver(update, world, sizes, message):
    with pytest.raises(UserError, match=message) as err:
        check_data_for_workers(DataConfig(**update), world, sizes)
    assert "\n" not in str(err.value)


def test_valid_settings_pass_and_imagefolder_ignores_crop_padding():
    check_data_for_workers(DataConfig(batch_size=117, cutout=31, crop_padding=31), 10, SIZES)
    check_data_for_workers(DataConfig(dataset="imagefolder", crop_padding=64), 1, {**SIZES, "test_size": None})
