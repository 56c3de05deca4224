"""Behaviour of every registered model x supported norm, parametrised from the registry.

Each case runs on CPU at the model's `test_input_size` (or its `input_size`), batch 3. The model is
built once per case (class-scoped fixture) and the checks run in order; the SGD check, which
changes the weights, runs last. Models may return a Tensor or a tuple of Tensors in train mode
(Conformer: one logit tensor per branch; the loss is the mean of their cross-entropies).
"""

import pytest
import torch
import torch.nn.functional as F

from kn_dist.models import create_model, list_models, model_info

BATCH = 3
NUM_CLASSES = 5  # a non-default head size also checks that num_classes reaches the head

CASES = [pytest.param((name, norm), id=f"{name}-{norm}") for name in list_models() for norm in model_info(name).norms]


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _loss(model, x, y) -> torch.Tensor:
    outs = _outputs(model(x))
    return sum(F.cross_entropy(o, y) for o in outs) / len(outs)


@pytest.fixture(scope="class")
def case(request):
    name, norm = request.param
    info = model_info(name)
    size = info.test_input_size or info.input_size
    torch.manual_seed(0)
    model = create_model(name, norm=norm, num_classes=NUM_CLASSES)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, size, size, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
    return name, norm, model, x, y


@pytest.mark.parametrize("case", CASES, indirect=True, scope="class")
class TestEveryModel:
    def test_forward_shape(self, case):
        _, _, model, x, _ = case
        model.eval()
        with torch.no_grad():
            out = model(x)
        assert isinstance(out, torch.Tensor), "eval forward must return one logit tensor"
        assert out.shape == (BATCH, NUM_CLASSES)
        model.train()
        with torch.no_grad():
            outs = _outputs(model(x))
        assert all(o.shape == (BATCH, NUM_CLASSES) for o in outs)

    def test_backward_finite(self, case):
        _, _, model, x, y = case
        model.train()
        model.zero_grad(set_to_none=True)
        loss = _loss(model, x, y)
        assert torch.isfinite(loss)
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"parameters without gradient (unused in forward; DDP would fail): {missing[:5]}"
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, f"non-finite gradients in {bad[:5]}"
        model.zero_grad(set_to_none=True)

    def test_eval_deterministic(self, case):
        _, _, model, x, _ = case
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x), model(x))

    def test_batch_independence(self, case):
        # Sample i's output must not depend on the other samples: compare it with sample i alone.
        # Eval mode (train mode draws dropout masks per batch); BatchNorm is batch-dependent by design.
        _, norm, model, x, _ = case
        if norm == "bn":
            pytest.skip("BatchNorm normalises over the batch")
        model.eval()
        with torch.no_grad():
            together = model(x)
            alone = torch.cat([model(x[i : i + 1]) for i in range(BATCH)])
        torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-4)

    def test_sgd_reduces_loss(self, case):
        # Plain gradient descent on one fixed batch: every step and both loss evaluations use the same
        # RNG seed, so dropout/drop-path masks are the same and the loss is one deterministic function.
        _, _, model, x, y = case
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def loss_at_seed() -> torch.Tensor:
            torch.manual_seed(123)
            return _loss(model, x, y)

        with torch.no_grad():
            before = loss_at_seed().item()
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss_at_seed().backward()
            opt.step()
        with torch.no_grad():
            after = loss_at_seed().item()
        assert after < before, f"loss went from {before:.4f} to {after:.4f}"
