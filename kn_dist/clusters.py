"""Checks for the cluster files in clusters/ before a person spends money on `ray up`.

Two kinds of file live there:
- `ray up` cluster configs (AWS, GCP, on-premise): checked with Ray's own validator
  (kn_dist.ray_compat.prepare_cluster_config: the functions `ray up` calls, the schema in
  ray/autoscaler/ray-schema.json) exactly as `ray up` does before it contacts a cloud;
- a KubeRay `RayCluster` manifest (apiVersion ray.io/v1): checked for its kind, its head group
  and pinned images.

Both get the network rule of DESIGN.md §6: nothing may be opened to the whole internet
(0.0.0.0/0, ::/0) and no server (MLflow, the Ray dashboard) may bind to 0.0.0.0. Any problem is a
`UserError` that names the file and the value.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from kn_dist.errors import UserError

# Ray images are pinned to a release ("2.60.0-py311-cu128"), never "latest"/"nightly"; the ray-ml
# images are deprecated and their `latest-gpu` tag still serves Ray 2.30 (DESIGN.md §7).
_PINNED_RAY_IMAGE = re.compile(r"^rayproject/ray:\d+\.\d+\.\d+(-py\d+)?(-(cpu|gpu|cu\d+))?$")
_WORLD_CIDR = re.compile(r"(?<![\d.])0\.0\.0\.0/0\b|(?<![0-9a-fA-F:])::/0\b")
# A server bound to every interface: `--host 0.0.0.0`, `--dashboard-host=0.0.0.0`, `-h 0.0.0.0`,
# or a bare "0.0.0.0" value (e.g. KubeRay's rayStartParams dashboard-host).
_ANY_ADDRESS = re.compile(r"(?<![\d.])0\.0\.0\.0(?![\d./])|(?<![0-9a-fA-F:])\[?::\]?(?=:\d|\s|$)")
# RFC 5737 documentation range: the placeholder for "your own network" in the shipped files.
PLACEHOLDER_CIDR = "203.0.113.0/24"


def public_exposures(node: Any, where: str = "") -> list[str]:
    """Every value under `node` that opens something to the whole internet, as 'key.path: value'.

    Walks mappings and lists recursively, so security-group IpRanges, GCP firewall sourceRanges,
    Kubernetes loadBalancerSourceRanges and shell commands (`mlflow server --host 0.0.0.0`) are
    all seen.
    """
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found += public_exposures(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += public_exposures(value, f"{where}[{i}]")
    elif isinstance(node, str) and (_WORLD_CIDR.search(node) or _ANY_ADDRESS.search(node)):
        found.append(f"{where}: {node.strip()[:120]!r}")
    return found


def placeholders(node: Any, where: str = "") -> list[str]:
    """Values the user still has to fill in ('REPLACE-ME'), as 'key.path: value'; empty when ready.

    The shipped files validate with them (Ray's schema only checks types); `ray up` would fail at the
    cloud API instead, after minutes, so a pre-flight check lists them first.
    """
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found += placeholders(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += placeholders(value, f"{where}[{i}]")
    elif isinstance(node, str) and "REPLACE-ME" in node:
        found.append(f"{where}: {node.strip()[:120]!r}")
    return found


def _images(node: Any) -> list[tuple[str, str]]:
    """(key path, image) for every `image`, `head_image` and `worker_image` value under `node`."""
    out: list[tuple[str, str]] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                path = f"{where}.{key}" if where else str(key)
                if key in ("image", "head_image", "worker_image") and isinstance(child, str):
                    out.append((path, child))
                else:
                    walk(child, path)
        elif isinstance(value, list):
            for i, child in enumerate(value):
                walk(child, f"{where}[{i}]")

    walk(node, "")
    return out


def load_cluster_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a cluster file into a mapping; a missing file or bad YAML is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cluster file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"cluster file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"cluster file {str(path)!r} must hold a mapping, not {type(raw).__name__}")
    return raw


def _check_network(path: Path, raw: dict[str, Any]) -> None:
    exposed = public_exposures(raw)
    if exposed:
        raise UserError(
            f"cluster file {str(path)!r} opens a port to the whole internet at {exposed[0]}; allow only your "
            f"own network (a CIDR such as {PLACEHOLDER_CIDR}) and bind servers to the node's private address"
        )


def _check_images(path: Path, raw: dict[str, Any], pattern: re.Pattern[str] = _PINNED_RAY_IMAGE) -> None:
    for where, image in _images(raw):
        if not pattern.match(image):
            raise UserError(
                f"cluster file {str(path)!r}: {where} is {image!r}; pin a Ray release image such as "
                "'rayproject/ray:2.60.0-py311-cu128' (not latest/nightly, not the deprecated ray-ml)"
            )


def _ray_error(err: BaseException) -> str:
    """One line from whatever Ray's validator raised (jsonschema, ValueError, click abort)."""
    path = getattr(err, "absolute_path", None)
    message = getattr(err, "message", None) or str(err)
    first = message.splitlines()[0] if message else type(err).__name__
    if path:
        return f"at {'.'.join(str(p) for p in path)}: {first}"
    return first


def validate_ray_up_config(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """Ray's own checks of a `ray up` config, without contacting a cloud; returns the prepared config.

    `ray up` runs `prepare_config` (merge the provider's defaults.yaml, setup commands, docker
    config, node-type worker limits), then the provider's bootstrap (cloud calls), then
    `validate_config` (ray-schema.json + node-type consistency). We run the first and the last:
    the bootstrap only fills cloud-side values (subnets, key pairs) that a file cannot get wrong.
    """
    import click
    import jsonschema

    from kn_dist.ray_compat import prepare_cluster_config

    try:
        prepared = prepare_cluster_config(raw)
    except (jsonschema.ValidationError, ValueError, KeyError, TypeError, RuntimeError, click.ClickException) as err:
        problem = _ray_error(err)
        raise UserError(f"cluster file {str(path)!r} fails Ray's cluster-config validation: {problem}") from None
    return prepared


def validate_kuberay_manifest(path: Path, raw: dict[str, Any]) -> None:
    """The parts of a KubeRay RayCluster that KubeRay itself would reject late (at apply time)."""
    if raw.get("apiVersion") != "ray.io/v1":
        raise UserError(f"cluster file {str(path)!r}: apiVersion must be 'ray.io/v1', got {raw.get('apiVersion')!r}")
    spec = raw.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("headGroupSpec"), dict):
        raise UserError(f"cluster file {str(path)!r}: a RayCluster needs spec.headGroupSpec")
    service = spec["headGroupSpec"].get("serviceType", "ClusterIP")
    if service in ("LoadBalancer", "NodePort"):
        raise UserError(
            f"cluster file {str(path)!r}: headGroupSpec.serviceType {service!r} publishes the Ray head outside "
            "Kubernetes; use ClusterIP and `kubectl port-forward`"
        )
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        if not {"groupName", "template"} <= set(group):
            raise UserError(f"cluster file {str(path)!r}: spec.workerGroupSpecs[{i}] needs groupName and template")


def validate_cluster_yaml(path: str | Path) -> dict[str, Any]:
    """Check one file of clusters/ and return its parsed content (prepared by Ray for `ray up` files).

    Raises UserError naming the file and the first problem: unreadable YAML, a Ray schema
    violation, an unpinned or deprecated image, or anything open to 0.0.0.0/0.
    """
    path = Path(path)
    raw = load_cluster_yaml(path)
    _check_network(path, raw)
    if raw.get("kind") == "RayCluster":
        validate_kuberay_manifest(path, raw)
        # The KubeRay image is ours (clusters/Dockerfile, FROM a pinned Ray image): it must carry a version tag.
        _check_images(path, raw, re.compile(r"^[\w.\-/]+:[\w.\-]*\d+\.\d+\.\d+[\w.\-]*$"))
        return raw
    if "kind" in raw or "apiVersion" in raw:
        raise UserError(f"cluster file {str(path)!r} is a Kubernetes {raw.get('kind')!r}; only RayCluster is supported")
    _check_images(path, raw)
    return validate_ray_up_config(path, raw)
