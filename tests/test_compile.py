"""torch.compile on KernelNorm models: forward and gradients as accurate as eager (issue 13 item 3), and the
training configuration compiled without graph breaks or recompile-limit hits (issue 24 item 2).

In the accuracy test every random op (dropout on the KernelNorm statistics, vit_cifar's stochastic depth)
is set to 0 so both paths compute the same function. The training configuration keeps them on: its graph
breaks are counted against a budget per family, and its compiled step is compared with eager under the
same draws (inductor's `fallback_random`).

Compiled and eager fp32 are both compared against the same model in fp64 (issue 22): the compiler may
reorder and fuse sums, so elementwise agreement between the two fp32 paths depends on the CPU's vector
width (1.6e-4 relative on a 2-core AMD EPYC, while both were 5e-3 from fp64). What compile must not do is
lose accuracy: its error against fp64 stays within a small multiple of eager's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from kn_families import FAMILIES, SIZE, build

from kn_dist import engine
from kn_dist.models import create_model

pytestmark = pytest.mark.slow

CASES = [
    ("convmixer_256_8", "kn", {"input_size": 16, "patch_size": 4, "kernel_size": 3, "kn_dropout_p": 0.0}, 16),
    ("vit_cifar", "kn", {"input_size": 16, "kn_dropout_p": 0.0, "drop_path_rate": 0.0}, 16),
    ("resnet18_cifar", "kn", {"kn_dropout_p": 0.0}, 16),
    # statistics merged from the block's parts (KNConcatConv2d) pass a Python object between modules; the
    # shortened DenseNet-BC of tests/kn_families.py: since issue 24 the whole model is one graph, and inductor
    # takes minutes on the 100-layer one here
    ("densenet/kn", "kn", {"kn_dropout_p": 0.0, "kn_head_dropout_p": 0.0}, 16),
]

# compiled error <= ERROR_FACTOR x eager error + FLOOR x |reference| (both against fp64); the floor covers
# tensors that eager happens to get nearly exact (fp32 round-off is ~6e-8 relative)
ERROR_FACTOR, FLOOR = 4.0, 1e-6


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).norm() / reference.norm().clamp_min(1e-300)).item()


def _output_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    return out, list(torch.autograd.grad(out.square().mean(), params))


@pytest.mark.parametrize(("name", "norm", "kwargs", "size"), CASES, ids=[c[0] for c in CASES])
def test_compiled_model_is_as_accurate_as_eager(name, norm, kwargs, size):
    torch.manual_seed(0)
    if name in FAMILIES:
        model = build(name, **kwargs)
    else:
        model = create_model(name, norm=norm, num_classes=10, **kwargs).train()
    reference = copy.deepcopy(model).double()
    x = torch.randn(4, 3, size, size)
    ref_out, ref_grads = _output_and_grads(reference, x.double())
    eager_out, eager_grads = _output_and_grads(model, x)
    compiled_out, compiled_grads = _output_and_grads(torch.compile(model), x)
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    pairs = [("output", eager_out, compiled_out, ref_out)]
    pairs += [(f"grad {s}", e, c, r) for s, e, c, r in zip(shapes, eager_grads, compiled_grads, ref_grads, strict=True)]
    for what, eager, compiled, ref in pairs:
        eager_error, compiled_error = _relative_error(eager, ref), _relative_error(compiled, ref)
        assert compiled_error <= ERROR_FACTOR * eager_error + FLOOR, (what, compiled_error, eager_error)
        assert eager_error < 0.05, (what, eager_error)  # the fp32 model itself computes the fp64 function


# ---------------------------------------------------------------- the training configuration (issue 24, item 2)

# Graph breaks allowed per family in the training configuration (dropout on in every KernelNorm, drop path
# on where the family has it): none. KNConv2d, KNConcatConv2d and the token KernelNorms are custom ops
# (kn_dist.layers.kn_ops), their dropout draws out-of-place `randint`s traced before them; before issue 24
# KNResNet-18 broke its graph 21 times and recompiled KNConv2d.forward past the limit of 8.
GRAPH_BREAK_BUDGET = dict.fromkeys(FAMILIES, 0)
GRAPHS_PER_MODE = 1  # one graph for the training step, one for evaluation


@pytest.mark.parametrize("label", list(FAMILIES))
def test_training_configuration_compiles_within_its_graph_break_budget(label):
    """dynamo alone (backend "eager": what graph breaks and recompiles depend on), the worker's settings,
    two training steps and an evaluation; hitting the recompile limit is an error, not a fallback to eager."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = build(label)
    x = torch.randn(2, 3, SIZE, SIZE)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(**engine.COMPILE_CONFIG, fail_on_recompile_limit_hit=True):
        compiled = torch.compile(model, backend="eager")
        for _ in range(2):
            out = compiled(x)
            (sum(out) if isinstance(out, tuple) else out).square().mean().backward()
        model.eval()
        with torch.no_grad():
            compiled(x)
    breaks = sum(counters["graph_break"].values())
    assert breaks <= GRAPH_BREAK_BUDGET[label], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 2 * GRAPHS_PER_MODE, dict(counters["stats"])


@pytest.mark.parametrize("label", ["convmixer/kn"])
def test_compiled_training_step_with_dropout_equals_eager_with_the_same_draws(label):
    """inductor with `fallback_random`: the compiled graph draws its dense dropout masks through the same aten
    calls as eager with dense draws (`dense_draws`), so both compute the same function; 17 KNConv2d custom ops
    with their masks, forward and backward."""
    import torch._inductor.config as inductor_config

    from kn_dist.layers.dropout_draws import dense_draws

    torch.manual_seed(0)
    model = build(label)
    x = torch.randn(2, 3, SIZE, SIZE)

    def step(m):
        torch.manual_seed(1)
        out = m(x)
        params = [p for p in model.parameters() if p.requires_grad]
        return out, torch.autograd.grad(out.square().mean(), params)

    with dense_draws():
        eager_out, eager_grads = step(model)
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True), torch._dynamo.config.patch(**engine.COMPILE_CONFIG):
        compiled_out, compiled_grads = step(torch.compile(model))
    assert _relative_error(compiled_out, eager_out.double()) < 1e-5
    for compiled, eager in zip(compiled_grads, eager_grads, strict=True):
        assert _relative_error(compiled, eager.double()) < 1e-4
