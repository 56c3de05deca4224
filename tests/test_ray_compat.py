"""Each place kn_dist touches Ray below its public API (kn_dist.ray_compat), checked against the installed Ray.

These fail, naming the touch, when a Ray upgrade renames or moves what kn_dist relies on; the
alternative is a silent change of behaviour (progress lines twice, a wrong concurrency limit).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kn_dist import ray_compat


def _ray_sources(subdir: str) -> str:
    import ray

    root = Path(ray.__file__).parent / subdir
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*.py"))


@pytest.mark.parametrize(
    "name, where",
    [(ray_compat.PRINT_PATCH_ENV_VAR, "train/v2"), (ray_compat.PREEMPTION_WATCHER_ENV_VAR, "train/v2")],
)
def test_ray_train_still_reads_the_env_vars_kn_dist_sets(name, where):
    assert name in _ray_sources(where), f"Ray no longer reads {name}; kn_dist.ray_compat must follow the rename"


def test_node_types_max_resources_by_hand():
    config = {
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 4}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 3},
            "cpu": {"resources": {"CPU": 2}, "max_workers": 5},
        },
    }
    assert ray_compat.node_types_max_resources(config) == {"CPU": 4 + 24 + 10, "GPU": 3.0}
    assert ray_compat.node_types_max_resources({}) is None


def test_cluster_config_validator_rejects_an_unknown_key():
    path = Path(__file__).resolve().parents[1] / "clusters" / "aws.yaml"
    import yaml

    raw = yaml.safe_load(path.read_text())
    assert ray_compat.prepare_cluster_config(raw)["available_node_types"]  # the shipped file passes
    with pytest.raises(Exception, match="not_a_ray_key"):
        ray_compat.prepare_cluster_config({**raw, "not_a_ray_key": 1})


@pytest.mark.ray
def test_fixed_local_cluster_has_no_autoscaler_and_the_coordinator_starts(ray_local):
    import ray

    assert ray_compat.autoscaler_max_resources() is None  # a local Ray cannot grow
    ray_compat.start_autoscaling_coordinator()
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert any("coordinator" in n.lower() for n in names), names
