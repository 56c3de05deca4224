"""The dropout draws of KernelNorm's statistics: one Bernoulli(p) per input element, exact.

KernelNorm takes its statistics from an inverted-dropout copy of its input (Nasirigerdeh et al.,
TMLR 2024). Two exact representations of the same draw:
- sparse: the sorted flat indices of the dropped elements. The gaps between successive dropped
  elements of an i.i.d. Bernoulli(p) sequence are i.i.d. Geometric(p) (trials to the first success),
  so drawing about p * numel geometric gaps and a cumulative sum gives the whole draw with ~1/p
  times fewer random numbers than one per element, and no input-sized mask. Used on CPU for p <= 0.25.
- dense: a bool mask, True where dropped, from 31 random bits per element (`torch.randint`; as fast as
  `bernoulli_` on CPU), exact to 2**-31 in p. Used on other devices (no host synchronisation), under
  torch.compile and for large p, where the sparse form has no advantage; `dense_draws()` forces it (the
  GPU's path, checked on a CPU).
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

SPARSE_MAX_P = 0.25
_FORCE_DENSE = [False]


@contextmanager
def dense_draws() -> Iterator[None]:
    """Within, every draw is a dense bool mask, as on a GPU: the GPU's code path, checked on a CPU."""
    saved = _FORCE_DENSE[0]
    _FORCE_DENSE[0] = True
    try:
        yield
    finally:
        _FORCE_DENSE[0] = saved


def is_channels_last(t: Tensor) -> bool:
    """Whether t (4-D) is stored channels_last (NHWC) rather than contiguous (NCHW)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def memory_flat(t: Tensor) -> Tensor:
    """t, contiguous or channels_last, as a 1-D view in memory order: the order flat drop indices use
    (KNConv2d computes a channels_last input in its own layout)."""
    return t.permute(0, 2, 3, 1).reshape(-1) if is_channels_last(t) else t.view(-1)


def floor_div(flat: Tensor, d: int) -> Tensor:
    """floor(flat / d) of non-negative int64 indices, as int64.

    Integer division is not vectorised on CPU; float64 division with floor is, and exact here: for
    integers a, b < 2**52 the rounded a / b never reaches the next integer (it is at least 1 / b below it).
    """
    return flat.to(torch.float64).div_(d).floor_().to(torch.int64)


def uses_sparse_draw(x: Tensor, dropout_p: float) -> bool:
    """Whether `draw_dropped` returns flat indices (CPU, small p, eager) rather than a bool mask."""
    if torch.compiler.is_compiling() or _FORCE_DENSE[0]:  # data-dependent sizes would break the graph
        return False
    return x.device.type == "cpu" and 0.0 < dropout_p <= SPARSE_MAX_P


def _dense_drop_mask(x: Tensor, dropout_p: float, generator: torch.Generator | None) -> Tensor:
    """Bool mask, shape and memory layout of x, True where dropped with probability dropout_p (to 2**-31).

    31 random bits per element, drawn out of place (`torch.randint_like`, which torch.compile traces, also
    with symbolic shapes; dynamo breaks the graph at an in-place `random_`, and `torch.randint` fails on
    symbolic sizes) and in x's memory order (NHWC for a channels_last x), so the mask has x's layout and
    elementwise ops with x read both in one order. The same call eagerly and compiled: with inductor's
    `fallback_random` a compiled model draws the masks an eager one draws (tests/test_compile.py).
    """
    bits = torch.randint_like(x, 0, 2**31, dtype=torch.int32, generator=generator)
    return bits < round(dropout_p * 2**31)


def _dropped_indices(
    numel: int, dropout_p: float, generator: torch.Generator | None, device, batch: int | None = None
) -> Tensor:
    """Sorted flat indices (int64) of the dropped elements among `numel`, each dropped w.p. dropout_p.

    Gaps are drawn `batch` at a time (by default enough that a second batch is needed w.p. < 1e-11).
    """
    if batch is None:
        expected = numel * dropout_p
        batch = int(expected + 7.0 * math.sqrt(expected) + 16)
    positions = []
    last = -1  # position of the last drawn drop
    while last < numel:
        # Geometric(p) by inversion: floor(log(U) / log(1 - p)) + 1 with U uniform on (0, 1], vectorised,
        # ~2x faster than `geometric_` on CPU. U = (b + 1) / 2**31 from 31 random bits b (int32 `random_`,
        # one generator word per gap: ~2x cheaper than a float64 `rand`), so every gap's distribution
        # function is exact to 2**-31, as the dense mask's p. The cap keeps a huge gap castable.
        bits = torch.empty(batch, dtype=torch.int32, device=device).random_(generator=generator)  # [0, 2**31)
        u = bits.to(torch.float64).add_(1.0).mul_(2.0**-31)
        gaps = u.log_().mul_(1.0 / math.log1p(-dropout_p)).floor_().clamp_(max=numel).add_(1.0)
        pos = gaps.to(torch.int64).cumsum_(0).add_(last)
        positions.append(pos)
        last = int(pos[-1])
    pos = positions[0] if len(positions) == 1 else torch.cat(positions)
    return pos[: int(torch.searchsorted(pos, numel))]


def draw_dropped(x: Tensor, dropout_p: float, generator: torch.Generator | None = None) -> Tensor:
    """The dropped elements of x for one draw: flat indices (int64, 1-D) or a bool mask (shape of x).

    Which form is returned is `uses_sparse_draw(x, dropout_p)`; both are the same distribution.
    """
    if uses_sparse_draw(x, dropout_p):
        return _dropped_indices(x.numel(), dropout_p, generator, x.device)
    return _dense_drop_mask(x, dropout_p, generator)


def dropped_mask(x: Tensor, dropped: Tensor) -> Tensor:
    """The bool mask (shape of x, True = dropped) of a `draw_dropped` result."""
    if dropped.dtype == torch.bool:
        return dropped
    # flat indices count in x's memory order: NHWC for a channels_last x, else NCHW
    mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if is_channels_last(x):
        mask = mask.contiguous(memory_format=torch.channels_last)
    memory_flat(mask)[dropped] = True
    return mask


def dropout_keep_mask(x: Tensor, dropout_p: float, generator: torch.Generator | None = None) -> Tensor:
    """A bool mask with one Bernoulli(1 - dropout_p) draw per element of x (True = kept).

    It consumes the random generator exactly as KNConv2d's own draw does, so a seeded layer and this
    mask under the same seed agree.
    """
    if dropout_p == 0:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    return ~dropped_mask(x, draw_dropped(x, dropout_p, generator))
