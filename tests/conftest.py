"""Shared fixtures: a real local Ray and a throw-away MLflow store.

`ray_local` starts Ray once per test module with an explicit CPU count (the CI machine has 2
cores shared with other work) and shuts it down afterwards; `mlflow_uri` is a fresh SQLite store
per test, absolute so Ray workers (which run in another directory) write to the same file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

RAY_TEST_CPUS = 2


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray with RAY_TEST_CPUS CPUs and no dashboard, quiet, for one test module."""
    import ray

    from kn_dist.runtime import init_ray

    if ray.is_initialized():  # another module's cluster leaked: start from a known state
        ray.shutdown()
    assert init_ray(num_cpus=RAY_TEST_CPUS) is True  # "local": never attach to a cluster started with `ray start`
    assert init_ray() is False  # kn_dist reuses a running Ray instead of starting its own
    yield
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    """`sqlite:////abs/tmp/mlflow.db`: an empty MLflow tracking store for one test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
