"""The GPU's code path of every KernelNorm family, run on a CPU (issue 24, item 5).

On a GPU the dropout of KernelNorm's statistics is a dense mask (no sparse flat indices), training runs
under bf16 or fp16 autocast and, with `channels_last: true`, in NHWC. Here every family's small model
(tests/kn_families.py: dropout on in every KernelNorm) runs forward and backward with dense draws forced
(`dense_draws`), under CPU autocast to bf16 and to fp16, contiguous and channels_last, and is compared with
the same model in fp32 under the same draws (same seed; draws follow the layout's memory order, so each
layout has its own fp32 reference).

Logits: relative error <= 5 % (bf16) / 1 % (fp16). Gradients: the cosine of the whole parameter gradient
with the fp32 one >= 0.9 (bf16) / 0.99 (fp16). The gradient bound is loose because a whole network's
gradient is not a smooth function of rounding: ReLUs and max-pools route it by the sign and the order of
their inputs, and some flip (KNResNet's fp32 gradient is itself 4 % from fp64 at 16 px, every KNConv2d alone
within 1e-7). Per layer the bounds are tight (tests/layers/test_kn_low_precision.py); with one gradient term
of the centred KNConv2d dropped, these cosines fell to 0.69-0.82.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from kn_families import FAMILIES, SIZE, build

from kn_dist.layers.dropout_draws import dense_draws

pytestmark = pytest.mark.slow

LOGIT_BOUND = {torch.bfloat16: 0.05, torch.float16: 0.01}
COSINE_BOUND = {torch.bfloat16: 0.9, torch.float16: 0.99}


def _step(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits in fp32, the whole parameter gradient as one float64 vector) of one training step."""
    torch.manual_seed(5)  # the same dropout draws in every run of a layout
    amp = torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)
    with dense_draws(), amp:
        out = model(x)
        out = torch.stack(out).sum(0) if isinstance(out, tuple) else out  # Conformer: two heads
        loss = F.cross_entropy(out.float(), torch.arange(x.shape[0]))
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    assert all(torch.isfinite(g).all() for g in grads)
    return out.float().detach(), torch.cat([g.flatten() for g in grads]).double()


@pytest.mark.parametrize("label", list(FAMILIES))
def test_autocast_and_channels_last_with_dense_draws_match_fp32(label):
    torch.manual_seed(0)
    model = build(label)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    for channels_last in (False, True):
        net = copy.deepcopy(model)
        inputs = x
        if channels_last:
            net, inputs = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        ref_out, ref_grad = _step(net, inputs, None)
        for dtype in (torch.bfloat16, torch.float16):
            out, grad = _step(net, inputs, dtype)
            logit_error = ((out - ref_out).norm() / ref_out.norm()).item()
            cosine = F.cosine_similarity(grad, ref_grad, dim=0).item()
            where = f"{label} channels_last={channels_last} {dtype}"
            assert logit_error <= LOGIT_BOUND[dtype], (where, logit_error)
            assert cosine >= COSINE_BOUND[dtype], (where, cosine)


def test_channels_last_is_the_same_function():
    """fp32, no dropout: channels_last and contiguous agree to rounding (a layout is not a different model)."""
    torch.manual_seed(0)
    model = build("convnext/kn", kn_dropout_p=0.0, kn_head_dropout_p=0.0)
    x = torch.randn(2, 3, SIZE, SIZE)
    ref_out, ref_grad = _step(model, x, None)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    out, grad = _step(cl, x.contiguous(memory_format=torch.channels_last), None)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert F.cosine_similarity(grad, ref_grad, dim=0).item() >= 1 - 1e-6
