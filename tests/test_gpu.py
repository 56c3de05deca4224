"""The GPU path (issue 13, item 5): autocast in bf16 and fp16, channels_last, torch.compile, a 1-GPU NCCL run.

Every test here needs CUDA and is skipped without it; `kn-dist bench gpu` (scripts/gpu-check.sh) runs
them on a GPU machine with `pytest -m gpu`. References are independent of the path under test: the
same model in fp32 / contiguous / eager on the same GPU, and a CPU run's accuracy.
"""

from __future__ import annotations

import pytest
import torch

from kn_dist import engine
from kn_dist.models import create_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda", 0) if torch.cuda.is_available() else None
DETERMINISTIC_KN = {"kn_dropout_p": 0.0}  # same function in both paths


def _model(name: str, norm: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, norm=norm, num_classes=10, **kwargs).to(CUDA).train()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize(
    "name, norm, kwargs",
    [
        ("resnet18_cifar", "kn", DETERMINISTIC_KN),
        ("resnet18_cifar", "bn", {}),
        ("convmixer_256_8", "kn", DETERMINISTIC_KN),
        ("densenet_bc100", "kn", DETERMINISTIC_KN | {"kn_head_dropout_p": 0.0}),  # KNConcatConv2d's autocast path
        ("vit_cifar", "kn", DETERMINISTIC_KN | {"drop_path_rate": 0.0}),
        ("vit_cifar", "kn_embed", DETERMINISTIC_KN | {"drop_path_rate": 0.0}),
    ],
)
def test_autocast_matches_fp32(precision, name, norm, kwargs):
    model = _model(name, norm, **kwargs)
    x = torch.randn(16, 3, 32, 32, device=CUDA)
    with torch.no_grad():
        reference = model(x).float()
        with engine.autocast(precision, CUDA):
            low = model(x).float()
    assert torch.isfinite(low).all()
    # bf16 has 8 bits of mantissa: relative agreement of the logits to a few percent of their scale.
    torch.testing.assert_close(low, reference, rtol=0.05, atol=0.05 * reference.abs().max().item())


def test_fp16_training_step_with_grad_scaler_is_finite():
    model = _model("resnet18_cifar", "kn")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = engine.build_scaler("fp16", CUDA)
    x, y = torch.randn(16, 3, 32, 32, device=CUDA), torch.randint(0, 10, (16,), device=CUDA)
    with engine.autocast("fp16", CUDA):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_channels_last_equals_contiguous():
    model = _model("resnet18_cifar", "kn", **DETERMINISTIC_KN)
    x = torch.randn(8, 3, 32, 32, device=CUDA)
    with torch.no_grad():
        reference = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, reference, rtol=1e-3, atol=1e-4)


def test_compile_on_cuda_equals_eager():
    model = _model("resnet18_cifar", "kn", **DETERMINISTIC_KN)
    x = torch.randn(8, 3, 32, 32, device=CUDA)
    eager = model(x)
    compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)
    params = list(model.parameters())
    ge = torch.autograd.grad(eager.square().mean(), params)
    gc = torch.autograd.grad(compiled.square().mean(), params)
    for a, b in zip(ge, gc, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5 * max(1.0, a.abs().max().item()))


@pytest.mark.ray
@pytest.mark.slow
def test_one_gpu_nccl_run_through_ray_train_learns_digits(tmp_path):
    """The real `kn-dist train` path on one GPU: NCCL process group, ToDevice loaders, bf16, channels_last."""
    from pathlib import Path

    from mlflow import MlflowClient

    from kn_dist.cli import main

    digits = Path(__file__).resolve().parents[1] / "experiments" / "digits_quick.yaml"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(
        [
            "train",
            str(digits),
            "scaling.num_workers=1",
            "scaling.in_process=false",  # through Ray Train's worker and NCCL, not the in-process path
            "scaling.use_gpu=true",
            "precision=bf16",
            "channels_last=true",
            f"data.root={tmp_path / 'data'}",
            f"checkpoint.storage_path={tmp_path / 'runs'}",
            "--tracking-uri",
            uri,
            "--address",
            "local",
        ]
    )
    assert code == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("digits_quick").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["val_top1"] >= 0.9  # CPU run: >= 0.95 at 6 epochs
