"""The `kn-dist models` table: every registered model x norm with its parameters and forward FLOPs.

Models are built on the meta device (no memory, no init), so even ConvMixer-1536/20 costs only its
Python construction; KNConv2d layers run as their convolution there (see `shape_probe`). FLOPs come
from `torch.utils.flop_counter.FlopCounterMode` on one forward pass of a (1, 3, S, S) input at the
model's registered size S, in eval mode. Like the usual "GFLOPs" of papers it counts matmuls and
convolutions (2 FLOPs per multiply-add), not norms, poolings or activations.
"""

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kn_dist.models._registry import create_model, list_models, model_info, shape_probe


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; meta tensors count too)."""
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, input_size: int, batch_size: int = 1) -> int:
    """Forward FLOPs of `model` (eval mode) on a (batch_size, 3, input_size, input_size) input on its device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(batch_size, 3, input_size, input_size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def model_rows(family: str | None = None) -> list[dict]:
    """One dict per (model, norm): name, family, norm, default, input_size, params, flops (None if it failed)."""
    rows = []
    for name in list_models(family):
        info = model_info(name)
        for norm in info.norms:
            with torch.device("meta"):
                model = create_model(name, norm=norm)
            try:
                flops: int | None = forward_flops(shape_probe(model), info.input_size)
            except (RuntimeError, ValueError, NotImplementedError):  # an op without a meta kernel
                flops = None
            rows.append(
                {
                    "name": name,
                    "family": info.family,
                    "norm": norm,
                    "default": norm == info.default_norm,
                    "input_size": info.input_size,
                    "num_classes": info.num_classes,
                    "params": count_parameters(model),
                    "flops": flops,
                }
            )
    return rows


def format_table(family: str | None = None) -> str:
    """A fixed-width table of `model_rows(family)`; the published norm of each model is marked '*'."""
    if family is not None and not list_models(family):
        families = sorted({model_info(n).family for n in list_models()})
        raise ValueError(f"unknown model family {family!r}; valid families are: {', '.join(families)}")
    header = ("model", "family", "norm", "input", "classes", "params", "GFLOPs")
    lines = []
    for r in model_rows(family):
        gflops = "n/a" if r["flops"] is None else f"{r['flops'] / 1e9:.3f}"
        norm = r["norm"] + ("*" if r["default"] else "")
        lines.append(
            (r["name"], r["family"], norm, str(r["input_size"]), str(r["num_classes"]), f"{r['params']:,}", gflops)
        )
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    numeric = {3, 4, 5, 6}

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    footer = "* = the normalisation the model was published with (create_model's default); FLOPs: one image, forward."
    return "\n".join([fmt(header), rule, *map(fmt, lines), "", footer])
