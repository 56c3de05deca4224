"""Every place kn_dist touches Ray below its public API, each with the reason and a test.

Ray is used through public APIs everywhere else (issue 12, item 4). What is here has no public
equivalent in Ray 2.60; tests/test_ray_compat.py checks each touch against the installed Ray and
fails loudly, naming the touch, when an upgrade moves or renames it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Ray Train V2 re-logs every print() of a worker through its `ray.train` logger when this is on, so each
# progress line would reach the console twice. Read by Ray Train's controller and workers; it travels
# in the job's runtime_env (kn_dist.runtime), so it reaches a remote cluster's workers too.
PRINT_PATCH_ENV_VAR = "RAY_TRAIN_ENABLE_PRINT_PATCH"

# Ray Train's preemption watcher (an extra actor per run that polls the GCS for draining nodes). On a local
# Ray, one machine that no cloud can preempt, it only costs a process and prints Ray issue #53727's
# constructor-argument error line; on clusters it stays on, so a drained node's run checkpoints and moves.
PREEMPTION_WATCHER_ENV_VAR = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"

# `ray up` writes the cluster's autoscaling config here on the head node (autoscaler v1).
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def autoscaler_max_resources() -> dict[str, float] | None:
    """The most CPU/GPU the cluster's autoscaler can provide (every node type at its max_workers), or None.

    Ray has no public API for "what could this cluster grow to". Ray Train itself asks the GCS for the
    autoscaler's cluster config (published there by KubeRay); on a head started with `ray start
    --autoscaling-config` (`ray up`, Ray's AutoscalingCluster) the same facts are in the file its
    autoscaler monitor reads, or `ray up`'s bootstrap config. None on a fixed cluster (a local Ray,
    `ray start` by hand).
    """
    import ray._private.state

    reported = ray._private.state.state.get_max_resources_from_cluster_config()
    if reported:
        return {k: float(v) for k, v in reported.items() if k in ("CPU", "GPU")}
    for path in (_running_monitor_config(), BOOTSTRAP_CONFIG.expanduser()):
        if path is not None and path.is_file():
            import yaml

            return node_types_max_resources(yaml.safe_load(path.read_text()) or {})
    return None


def _running_monitor_config() -> Path | None:
    """The `--autoscaling-config` file of the autoscaler monitor running on this machine (the head), if any.

    Autoscaler v1 and v2 monitors started by `ray start --autoscaling-config` (`ray up`, Ray's local
    AutoscalingCluster) read their node types from that file and do not publish them in the GCS.
    """
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if not any(part.endswith(("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")) for part in cmdline):
            continue
        for part in cmdline:
            if part.startswith("--autoscaling-config="):
                return Path(part.split("=", 1)[1]).expanduser()
    return None


def node_types_max_resources(cluster_config: dict[str, Any]) -> dict[str, float] | None:
    """Sum of max_workers x resources over an autoscaler config's available_node_types (head counted once)."""
    types = cluster_config.get("available_node_types") or {}
    head = cluster_config.get("head_node_type")
    total: dict[str, float] = {}
    for name, node_type in types.items():
        count = 1 if name == head else int(node_type.get("max_workers", 0))
        for key in ("CPU", "GPU"):
            total[key] = total.get(key, 0.0) + count * float((node_type.get("resources") or {}).get(key, 0))
    return total or None


def prepare_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """A `ray up` cluster config prepared and validated exactly as `ray up` does before it contacts a cloud.

    Ray exposes no public validator; these are the two functions `ray up` calls: `prepare_config`
    (the provider's defaults merged in) and `validate_config` (ray/autoscaler/ray-schema.json and the
    node-type checks). Raises whatever Ray raises for an invalid file.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def start_autoscaling_coordinator() -> None:
    """Start Ray Train's autoscaling-coordinator actor now, without waiting for it.

    Every TorchTrainer controller asks this detached actor for resources with a 5 s timeout, twice, before
    it starts its workers; when the actor's own start-up (a new process importing Ray Data) takes longer,
    both calls time out: 10 s lost and a warning with a traceback (issue 13, item 4). Started right after
    `ray.init`, it is ready by the time the first controller asks.
    """
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    get_or_create_autoscaling_coordinator()
