"""Behaviour of every registered model x supported norm, parametrised from the registry.

Each case runs on CPU at the model's `test_input_size` (or its `input_size`), batch 2. The model is
built once per case (class-scoped fixture) and the checks run in the order written: the eval-mode
checks share one forward pass, so they come before the train-mode ones, which update BatchNorm's
running statistics, and the SGD check, which changes the weights, runs last. Models may return a
Tensor or a tuple of Tensors in train mode (Conformer: one logit tensor per branch; the loss is the
mean of their cross-entropies).
"""

import pytest
import torch
import torch.nn.functional as F

from kn_dist.models import create_model, list_models, model_info

BATCH = 2
NUM_CLASSES = 5  # a non-default head size also checks that num_classes reaches the head


def _case_param(name: str, norm: str):
    # ImageNet-size models are the expensive part (init of 10-50 M weights): marked slow, still run in CI.
    marks = [pytest.mark.slow] if model_info(name).input_size >= 128 else []
    return pytest.param((name, norm), id=f"{name}-{norm}", marks=marks)


# Aliases (knresnet18 = resnet18 with "kn") are the same models: tests/models/test_registry.py checks that.
CASES = [
    _case_param(name, norm)
    for name in list_models()
    if model_info(name).alias_of is None
    for norm in model_info(name).norms
]


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _loss(model, x, y) -> torch.Tensor:
    outs = _outputs(model(x))
    return sum(F.cross_entropy(o, y) for o in outs) / len(outs)


@pytest.fixture(scope="class")
def case(request) -> dict:
    name, norm = request.param
    info = model_info(name)
    size = info.test_input_size or info.input_size
    torch.manual_seed(0)
    model = create_model(name, norm=norm, num_classes=NUM_CLASSES)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, size, size, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
    return {"name": name, "norm": norm, "model": model, "x": x, "y": y}


def _eval_output(case: dict) -> torch.Tensor:
    """The eval-mode output on the case's batch, computed once (checked by test_forward_shape)."""
    if "eval_out" not in case:
        case["model"].eval()
        with torch.no_grad():
            case["eval_out"] = case["model"](case["x"])
    return case["eval_out"]


@pytest.mark.parametrize("case", CASES, indirect=True, scope="class")
class TestEveryModel:
    def test_forward_shape(self, case):
        out = _eval_output(case)
        assert isinstance(out, torch.Tensor), "eval forward must return one logit tensor"
        assert out.shape == (BATCH, NUM_CLASSES)

    def test_eval_deterministic(self, case):
        first = _eval_output(case)
        case["model"].eval()
        with torch.no_grad():
            assert torch.equal(case["model"](case["x"]), first)

    def test_batch_independence(self, case):
        # Sample i's output must not depend on the other samples: compare it with sample i alone.
        # Eval mode (train mode draws dropout masks per batch); BatchNorm is batch-dependent by design.
        if case["norm"] == "bn":
            pytest.skip("BatchNorm normalises over the batch")
        together = _eval_output(case)
        case["model"].eval()
        with torch.no_grad():
            alone = torch.cat([case["model"](case["x"][i : i + 1]) for i in range(BATCH)])
        # fp32 rounding alone: through ConvMixer-768/32's 32 ReLU + GroupNorm blocks a batch-2 and a batch-1
        # forward differ by 2e-4 (each is 1e-4 from an fp64 forward, which is batch-independent to 1e-16),
        # while a norm that mixes samples moves these O(1) logits by far more than 1e-3.
        torch.testing.assert_close(alone, together, rtol=1e-3, atol=1e-3)

    def test_backward_finite(self, case):
        model = case["model"].train()
        model.zero_grad(set_to_none=True)
        outs = _outputs(model(case["x"]))
        assert all(o.shape == (BATCH, NUM_CLASSES) for o in outs)
        loss = sum(F.cross_entropy(o, case["y"]) for o in outs) / len(outs)
        assert torch.isfinite(loss)
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"parameters without gradient (unused in forward; DDP would fail): {missing[:5]}"
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, f"non-finite gradients in {bad[:5]}"
        model.zero_grad(set_to_none=True)

    def test_sgd_reduces_loss(self, case):
        # A gradient-descent step on one fixed batch (runs last: it changes the weights). Both loss
        # evaluations reseed the RNG, so dropout / drop-path masks are the same each time and the
        # loss is one deterministic function of the weights. The gradient is clipped to norm 1, so each
        # step moves the weights by at most lr whatever the model's gradient scale (51 M-parameter
        # ConvMixers and 0.8 M-parameter DenseNets alike). A correct gradient must lower the loss for
        # a small enough step; deep BN stacks (ConvMixer-768/32) overshoot at the first lr, so the
        # step is halved up to three times (backtracking), as any line search would.
        model, x, y = case["model"].train(), case["x"], case["y"]
        torch.manual_seed(123)
        loss = _loss(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        params = [p for p in model.parameters() if p.grad is not None]
        start = [p.detach().clone() for p in params]
        tried = []
        for lr in (0.02, 0.01, 0.005, 0.0025):
            with torch.no_grad():
                for p, p0 in zip(params, start, strict=True):
                    p.copy_(p0 - lr * p.grad)
                torch.manual_seed(123)
                after = _loss(model, x, y).item()
            tried.append(f"lr {lr}: {after:.5f}")
            if after < loss.item():
                break
        assert after < loss.item(), f"loss {loss.item():.5f} did not drop: {', '.join(tried)}"
