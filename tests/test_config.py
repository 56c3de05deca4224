"""Typed config: strict keys, overrides, cross-section checks, flat/YAML views (issue 6)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kn_dist import config
from kn_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_and_yaml_sections(tmp_path):
    cfg = config.load(_write(tmp_path, "epochs: 3\noptim:\n  name: adamw\n  lr: 0.002\n"))
    assert (cfg.epochs, cfg.optim.name, cfg.optim.lr) == (3, "adamw", 0.002)
    assert cfg.optim.momentum == 0.9  # untouched keys keep their defaults


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("optim:\n  lrr: 0.1\n", "optim.lrr"),
        ("epoch: 3\n", "epoch"),
        ("data:\n  batchsize: 3\n", "data.batchsize"),
        ("scaling:\n  num_workers: 2\n  gpus: 1\n", "scaling.gpus"),
    ],
)
def test_unknown_key_is_named(tmp_path, text, key):
    with pytest.raises(UserError, match=rf"unknown config key '{key}'"):
        config.load(_write(tmp_path, text))


def test_wrong_type_is_named():
    with pytest.raises(UserError, match=r"config key 'optim.lr'.*'fast'"):
        config.load(None, ["optim.lr=fast"])
    with pytest.raises(UserError, match=r"config key 'epochs'"):
        config.load(None, ["epochs=0"])  # must be >= 1


def test_overrides_are_parsed_as_yaml_and_nest():
    cfg = config.load(
        None, ["optim.lr=0.05", "model.kwargs.kn_kernel_size=3", "model.norm=null", "schedule.milestones=[3, 6]"]
    )
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.model.kwargs == {"kn_kernel_size": 3}
    assert cfg.model.norm is None
    assert cfg.schedule.milestones == [3, 6]


def test_override_unknown_key_and_bad_form():
    with pytest.raises(UserError, match="unknown config key 'optim.momentun'"):
        config.load(None, ["optim.momentun=0.8"])
    with pytest.raises(UserError, match="key=value"):
        config.load(None, ["optim.lr"])
    with pytest.raises(UserError, match="is a value, not a section"):
        config.load(None, ["epochs=3", "epochs.x=1"])


def test_cross_section_checks():
    with pytest.raises(UserError, match=r"schedule.milestones \[12\] must lie within 1..epochs \(10\)"):
        config.load(None, ["epochs=10", "schedule.name=multistep", "schedule.milestones=[5, 12]"])
    with pytest.raises(UserError, match="min_lr"):
        config.load(None, ["optim.lr=0.01", "schedule.min_lr=0.1"])
    with pytest.raises(UserError, match="fp16 needs scaling.use_gpu"):
        config.load(None, ["precision=fp16"])
    with pytest.raises(UserError, match="config key 'name'"):
        config.load(None, ["name=../escape"])  # a run name is one directory under storage_path


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="mapping"):
        config.load(_write(tmp_path, "- 1\n- 2\n"))


def test_flat_dict_names_match_the_mlflow_contract():
    flat = config.to_flat_dict(config.load(None, ["model.kwargs.kn_kernel_size=3"]))
    assert flat["optim.lr"] == 0.1
    assert flat["model.name"] == "resnet18_cifar"
    assert flat["model.kwargs.kn_kernel_size"] == 3
    assert flat["scaling.placement_strategy"] == "PACK"
    assert all(not isinstance(v, dict) for v in flat.values())


def test_yaml_round_trip(tmp_path):
    cfg = config.load(None, ["optim.lr=0.05", "model.kwargs.kn_dropout_p=0.1", "schedule.milestones=[2]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml(cfg))
    assert config.load(path) == cfg
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == 0.05


RECIPES = sorted(p for p in (REPO / "experiments").rglob("*.yaml") if not {"sweeps", "studies"} & set(p.parts))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "experiments")))
def test_shipped_experiments_load(path):
    cfg = config.load(path)
    assert cfg.name == yaml.safe_load(path.read_text())["name"]  # the file's own name, not the default
