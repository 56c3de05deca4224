"""clusters/: every `ray up` file passes Ray's own validator, nothing is open to the internet, and the
KubeRay manifest is a RayCluster with pinned images. Bad files give a UserError naming file and problem."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from kn_dist.clusters import placeholders, public_exposures, validate_cluster_yaml
from kn_dist.errors import UserError

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
RAY_UP_FILES = ["aws.yaml", "gcp.yaml", "local.yaml"]
RAY_VERSION = "2.60.0"


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _write(tmp_path: Path, raw: dict, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_every_file_is_covered():
    names = sorted(p.name for p in CLUSTERS.glob("*.yaml"))
    assert names == sorted([*RAY_UP_FILES, "kuberay-raycluster.yaml"])


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_file_passes_rays_schema(name):
    raw = yaml.safe_load((CLUSTERS / name).read_text())
    # The raw file against Ray's JSON schema directly (independent of our wrapper)...
    jsonschema.validate(raw, _ray_schema())
    # ...and the full `ray up` preparation + validation as our wrapper runs it.
    prepared = validate_cluster_yaml(CLUSTERS / name)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_files_have_cpu_head_and_autoscaling_gpu_workers(name):
    raw = yaml.safe_load((CLUSTERS / name).read_text())
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpus = {t["resources"].get("GPU", 0) for n, t in types.items() if n != raw["head_node_type"]}
    assert {1, 8} <= gpus
    workers = [t for n, t in types.items() if n != raw["head_node_type"]]
    assert all(t.get("min_workers", 0) == 0 for t in workers), "GPU workers must scale to zero"
    text = json.dumps(raw)
    assert ("InstanceMarketOptions" in text) if name == "aws.yaml" else ("SPOT" in text), "no spot option"
    # Pinned Ray release images, never the deprecated ray-ml ones.
    assert raw["docker"]["head_image"].startswith(f"rayproject/ray:{RAY_VERSION}-py311")
    assert raw["docker"]["worker_image"].startswith(f"rayproject/ray:{RAY_VERSION}-py311-cu")
    # Cloud storage for checkpoints and MLflow artifacts.
    scheme = "s3://" if name == "aws.yaml" else "gs://"
    assert scheme in " ".join(raw["setup_commands"])


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_setup_installs_ffcv_system_packages_and_the_project(name):
    raw = yaml.safe_load((CLUSTERS / name).read_text())
    setup = " ".join(raw["setup_commands"])
    if name == "local.yaml":
        assert "scripts/setup.sh" in setup  # installs the same packages (checked below)
        setup = (CLUSTERS.parent / "scripts" / "setup.sh").read_text()
    for pkg in ("pkg-config", "libopencv-dev", "libturbojpeg0-dev"):
        assert pkg in setup
    assert raw["file_mounts"]["~/kn_dist"] == "."  # the submitted revision


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_mlflow_and_dashboard_bind_private_addresses(name):
    raw = yaml.safe_load((CLUSTERS / name).read_text())
    head = " ".join(raw["head_start_ray_commands"])
    assert "start-mlflow.sh" in head and "hostname -I" in head
    assert "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in head
    script = (CLUSTERS / "start-mlflow.sh").read_text()
    assert re.search(r"mlflow server .*--backend-store-uri \"sqlite:///", script.replace("\\\n", " "))
    assert '--host "$addr"' in script


def test_no_file_exposes_a_port_to_the_internet():
    for path in sorted(CLUSTERS.glob("*.yaml")):
        assert public_exposures(yaml.safe_load(path.read_text())) == [], path.name
    # Non-YAML files (scripts, Dockerfile): no 0.0.0.0 outside comments and the refusal guard.
    for path in sorted(p for p in CLUSTERS.iterdir() if p.suffix not in (".yaml", ".md")):
        code = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
        hits = [ln for ln in code if "0.0.0.0" in ln and "refusing" not in ln]
        assert hits == [], f"{path.name}: {hits}"


def test_no_credentials_in_files():
    secret = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|BEGIN [A-Z ]*PRIVATE KEY|\"private_key\"")
    for path in sorted(CLUSTERS.iterdir()):
        assert not secret.search(path.read_text()), path.name


@pytest.mark.parametrize(
    "fragment",
    [
        {"IpRanges": [{"CidrIp": "0.0.0.0/0"}], "FromPort": 5000},
        {"sourceRanges": ["::/0"]},
        {"cmd": ["mlflow server --host 0.0.0.0 --port 5000"]},
        {"cmd": ["ray start --head --dashboard-host=0.0.0.0"]},
        {"rayStartParams": {"dashboard-host": "0.0.0.0"}},
    ],
)
def test_public_exposures_are_found(fragment):
    assert public_exposures({"a": [fragment]}) != []


def test_private_addresses_are_not_exposures():
    ok = {"cidr": "10.0.0.0/8", "b": "--host 10.0.0.5", "c": "192.0.2.10", "d": "--dashboard-host=127.0.0.1"}
    assert public_exposures(ok) == []


def test_kuberay_manifest():
    path = CLUSTERS / "kuberay-raycluster.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["apiVersion"] == "ray.io/v1" and raw["kind"] == "RayCluster"
    assert raw["spec"]["rayVersion"] == RAY_VERSION
    head = raw["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    images = {c["image"] for c in head["template"]["spec"]["containers"]}
    for group in raw["spec"]["workerGroupSpecs"]:
        images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    tag = f"ray{RAY_VERSION}-py311-cu"
    assert all(tag in image and not image.endswith(":latest") for image in images), images
    # The image it names is built FROM the pinned Ray release image.
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY_VERSION)}-py311-cu\d+$", dockerfile, re.M)
    gpus = sorted(
        g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        for g in raw["spec"]["workerGroupSpecs"]
    )
    assert gpus == [1, 8]
    validate_cluster_yaml(path)


# --- bad files: one UserError that names the file and the problem -------------------------------------


def _aws() -> dict:
    return yaml.safe_load((CLUSTERS / "aws.yaml").read_text())


def _case(mutate):
    raw = _aws()
    mutate(raw)
    return raw


BAD = [
    ("typo in a top-level key", _case(lambda r: r.update(max_worker=3)), "max_worker"),
    ("wrong type", _case(lambda r: r.update(max_workers="ten")), "max_workers"),
    ("head type missing", _case(lambda r: r.update(head_node_type="nope")), "head_node_type"),
    ("node type without resources", _case(lambda r: r["available_node_types"]["gpu1"].pop("resources")), "resources"),
    (
        "ssh open to the world",
        _case(
            lambda r: r["provider"].update(
                security_group={
                    "GroupName": "x",
                    "IpPermissions": [
                        {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
                    ],
                }
            )
        ),
        "0.0.0.0/0",
    ),
    (
        "mlflow on every interface",
        _case(lambda r: r["head_start_ray_commands"].append("mlflow server --host 0.0.0.0")),
        "head_start_ray_commands",
    ),
    (
        "deprecated ray-ml image",
        _case(lambda r: r["docker"].update(worker_image="rayproject/ray-ml:latest-gpu")),
        "ray-ml",
    ),
    ("unpinned image", _case(lambda r: r["docker"].update(head_image="rayproject/ray:latest")), "latest"),
]


@pytest.mark.parametrize("label,raw,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_cluster_files_name_file_and_problem(tmp_path, label, raw, needle):
    path = _write(tmp_path, raw, "bad-cluster.yaml")
    with pytest.raises(UserError) as info:
        validate_cluster_yaml(path)
    message = str(info.value)
    assert "bad-cluster.yaml" in message and needle in message, message
    assert "\n" not in message


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        validate_cluster_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("cluster_name: [unclosed\n")
    with pytest.raises(UserError, match="broken.yaml.*not valid YAML"):
        validate_cluster_yaml(bad)


def test_kuberay_bad_api_version(tmp_path):
    raw = copy.deepcopy(yaml.safe_load((CLUSTERS / "kuberay-raycluster.yaml").read_text()))
    raw["apiVersion"] = "ray.io/v1alpha1"
    with pytest.raises(UserError, match="apiVersion"):
        validate_cluster_yaml(_write(tmp_path, raw))


def test_placeholders_are_listed_until_filled():
    raw = yaml.safe_load((CLUSTERS / "aws.yaml").read_text())
    todo = placeholders(raw)
    assert any("ImageId" in t for t in todo) and any("SecurityGroupIds" in t for t in todo)
    assert any("KN_DIST_STORAGE" in t for t in todo)
    filled = yaml.safe_load(yaml.safe_dump(raw).replace("REPLACE-ME", "x1"))
    assert placeholders(filled) == []


def test_kuberay_head_published_outside_kubernetes(tmp_path):
    raw = yaml.safe_load((CLUSTERS / "kuberay-raycluster.yaml").read_text())
    raw["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    with pytest.raises(UserError, match="serviceType 'LoadBalancer'"):
        validate_cluster_yaml(_write(tmp_path, raw))


# --- ImageNet across nodes (issue 26) ------------------------------------------------------------------


def _gpu8_capacity(raw: dict) -> tuple[int, float]:
    """(8-GPU nodes the cluster can grow to, CPUs of such a node) of a `ray up` file or a KubeRay manifest."""
    if raw.get("kind") == "RayCluster":
        groups = [g for g in raw["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu8"]
        limits = groups[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
        return sum(g["maxReplicas"] for g in groups), float(limits["cpu"])
    types = [t for t in raw["available_node_types"].values() if t["resources"].get("GPU") == 8]
    return sum(t["max_workers"] for t in types), min(float(t["resources"]["CPU"]) for t in types)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml", "kuberay-raycluster.yaml"])
def test_imagenet_studies_fit_two_8gpu_nodes_that_share_the_data(name):
    from kn_dist import config

    raw = yaml.safe_load((CLUSTERS / name).read_text())
    nodes, cpus = _gpu8_capacity(raw)
    for depth in (18, 34, 50):
        study = yaml.safe_load(
            (CLUSTERS.parent / "experiments" / "studies" / f"imagenet_resnet{depth}.yaml").read_text()
        )
        scaling = config.from_dict({k: v for k, v in study.items() if k not in ("tune", "study")}).scaling
        assert scaling.num_workers > 8 and nodes * 8 >= scaling.num_workers, f"{name}: a run spans 8-GPU nodes"
        assert 8 * scaling.cpus_per_worker <= cpus, f"{name}: eight workers' CPUs fit one gpu8 node"
    # One copy of the data for every node: a shared filesystem at /mnt/kn_dist, named by KN_DIST_SHARED_DATA.
    if name == "kuberay-raycluster.yaml":
        specs = [raw["spec"]["headGroupSpec"]["template"]["spec"]]
        specs += [g["template"]["spec"] for g in raw["spec"]["workerGroupSpecs"]]
        for spec in specs:
            claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in spec["volumes"]}
            assert claims.get("shared-data") == "kn-dist-shared"
            ray_container = spec["containers"][0]
            assert {"name": "shared-data", "mountPath": "/mnt/kn_dist"} in ray_container["volumeMounts"]
            assert {"name": "KN_DIST_SHARED_DATA", "value": "/mnt/kn_dist/data"} in ray_container["env"]
    else:
        mount = " ".join(raw["initialization_commands"])  # on the VM, before Docker starts
        assert re.search(r"mount -t nfs4? .* /mnt/kn_dist", mount), mount
        assert "--volume=/mnt/kn_dist:/mnt/kn_dist" in raw["docker"]["run_options"]
        assert "KN_DIST_SHARED_DATA=/mnt/kn_dist/data" in " ".join(raw["setup_commands"])
