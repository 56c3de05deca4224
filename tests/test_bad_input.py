"""Bad input, table-driven (issue 8): every case exits with code 2, prints one line naming the
problem, and leaves what is already on disk untouched (a real .beton, a real MLflow store with a
run, a checkpoint directory).

The CLI runs in-process (`kn_dist.cli.main`) so thirty cases cost seconds, not thirty Python
start-ups; what is asserted is exactly what a shell sees: the exit code and stderr.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from kn_dist.cli import main

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "experiments" / "digits_quick.yaml"


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding real results: digits .betons, an MLflow store with one run, a checkpoint."""
    from kn_dist.data import write_dataset

    ws = tmp_path_factory.mktemp("bad_input")
    write_dataset("digits", ws / "data" / "digits")
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("kept", artifact_location=str(ws / "artifacts"))
    run = client.create_run(exp, tags={"kn_dist.model": "resnet18_cifar", "kn_dist.norm": "bn"})
    client.log_metric(run.info.run_id, "val_top1", 0.5, step=1)
    client.set_terminated(run.info.run_id)
    ckpt = ws / "runs" / "kept" / "checkpoint_000000"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"\x00checkpoint bytes")

    (ws / "empty.beton").write_bytes(b"")
    (ws / "random.beton").write_bytes(bytes(range(256)) * 64)
    (ws / "list.yaml").write_text("- a\n- b\n")
    (ws / "broken.yaml").write_text("model: {name: [\n")
    good_train = (ws / "data" / "digits" / "train.beton").read_bytes()
    (ws / "truncated.beton").write_bytes(good_train[: len(good_train) // 3])

    aws = yaml.safe_load((REPO / "clusters" / "aws.yaml").read_text())
    open_to_world = {
        **aws,
        "provider": {
            **aws["provider"],
            "security_group": {
                "IpPermissions": [
                    {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
                ]
            },
        },
    }
    (ws / "open.yaml").write_text(yaml.safe_dump(open_to_world))
    unpinned = {**aws, "docker": {**aws["docker"], "head_image": "rayproject/ray:latest"}}
    (ws / "unpinned.yaml").write_text(yaml.safe_dump(unpinned))
    no_provider = {k: v for k, v in aws.items() if k != "provider"}
    (ws / "no_provider.yaml").write_text(yaml.safe_dump(no_provider))
    return ws


TRAIN = ["train", str(DIGITS), "data.root=data"]
ISOLATED = ["--tracking-uri", "sqlite:///mlflow.db"]

# (case id, argv, a word the message must contain)
CASES = [
    # config
    ("unknown top-level key", [*TRAIN, "epoch=3", *ISOLATED], "epoch"),
    ("unknown nested key", [*TRAIN, "optim.lrr=0.1", *ISOLATED], "optim.lrr"),
    ("wrong type", [*TRAIN, "epochs=many", *ISOLATED], "epochs"),
    ("out of range", [*TRAIN, "optim.lr=-1", *ISOLATED], "optim.lr"),
    ("bad choice", [*TRAIN, "precision=fp8", *ISOLATED], "precision"),
    ("override without =", [*TRAIN, "optim.lr", *ISOLATED], "optim.lr"),
    ("override into a value", [*TRAIN, "epochs.x=1", *ISOLATED], "epochs"),
    ("missing config file", ["train", "nope.yaml", *ISOLATED], "nope.yaml"),
    ("config not a mapping", ["train", "list.yaml", *ISOLATED], "list.yaml"),
    ("config not YAML", ["train", "broken.yaml", *ISOLATED], "broken.yaml"),
    # CLI
    ("unknown subcommand", ["frobnicate"], "frobnicate"),
    ("train without config", ["train"], "config"),
    ("unknown bench target", ["bench", "warp"], "warp"),
    (
        "--compile on a bench other than models",
        ["bench", "layers", "--compile"],
        "--compile applies to `kn-dist bench models` only",
    ),
    ("unknown dataset to write", ["data", "write", "mnist", "--out", "x"], "mnist"),
    ("unknown model family", ["models", "--family", "mlp"], "mlp"),
    # model / norm / geometry
    ("unknown model", [*TRAIN, "model.name=resnet19", *ISOLATED], "resnet19"),
    ("unsupported norm", [*TRAIN, "model.norm=kn_down", *ISOLATED], "kn_down"),
    (
        "kernel larger than map",
        [*TRAIN, "model.name=vit_cifar", "model.norm=kn", "model.kwargs={kn_kernel_size: 16}", *ISOLATED],
        "16",
    ),
    ("patch larger than image", [*TRAIN, "model.kwargs={patch_size: 64}", *ISOLATED], "64"),
    ("unknown model kwarg", [*TRAIN, "model.kwargs={depthh: 3}", *ISOLATED], "depthh"),
    # data files
    ("dataset not written", [*TRAIN, "data.dataset=cifar100", "data.root=nodata", *ISOLATED], "does not exist"),
    ("inspect missing file", ["data", "inspect", "missing.beton"], "missing.beton"),
    ("inspect empty file", ["data", "inspect", "empty.beton"], "empty.beton"),
    ("inspect random bytes", ["data", "inspect", "random.beton"], "random.beton"),
    ("inspect truncated file", ["data", "inspect", "truncated.beton"], "truncated.beton"),
    (
        "train on corrupt beton",
        [*TRAIN, "data.train_path=random.beton", "data.val_path=data/digits/val.beton", *ISOLATED],
        "random.beton",
    ),
    (
        "train on missing val beton",
        [*TRAIN, "data.train_path=data/digits/train.beton", "data.val_path=gone.beton", *ISOLATED],
        "gone.beton",
    ),
    # tracking URI
    ("unreachable tracking server", [*TRAIN, "--tracking-uri", "http://127.0.0.1:9"], "127.0.0.1:9"),
    ("plain file store", [*TRAIN, "--tracking-uri", "file:///tmp/mlruns"], "file:///tmp/mlruns"),
    ("sqlite in missing folder", [*TRAIN, "--tracking-uri", "sqlite:///no/such/dir/m.db"], "no/such/dir"),
    ("best on unknown experiment", ["best", "--tracking-uri", "sqlite:///mlflow.db", "--experiment", "zzz"], "zzz"),
    # cluster YAML
    ("cluster file missing", ["cluster", "check", "nowhere.yaml"], "nowhere.yaml"),
    ("cluster file not YAML", ["cluster", "check", "broken.yaml"], "broken.yaml"),
    ("cluster open to the world", ["cluster", "check", "open.yaml"], "0.0.0.0/0"),
    ("cluster unpinned image", ["cluster", "check", "unpinned.yaml"], "rayproject/ray:latest"),
    ("cluster without provider", ["cluster", "check", "no_provider.yaml"], "provider"),
    # sweeps
    ("missing sweep file", ["tune", "sweeps/none.yaml", "--tracking-uri", "sqlite:///mlflow.db"], "none.yaml"),
]


@pytest.mark.parametrize("argv,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_keeps_results(
    workspace: Path, argv: list[str], needle: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = _tree_digest(workspace)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("kn-dist: error:"), lines[0]
    assert needle in lines[0], lines[0]
    assert _tree_digest(workspace) == before, "a bad-input case changed existing files"
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    kept = client.search_runs([client.get_experiment_by_name("kept").experiment_id])
    assert len(kept) == 1 and kept[0].data.metrics["val_top1"] == 0.5
