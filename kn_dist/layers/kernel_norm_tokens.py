"""KernelNorm on token sequences that lie on a 2-D grid (ViT / Conformer transformer branch).

KernelNorm (Nasirigerdeh et al., "Kernel Normalized Convolutional Networks", TMLR 2024) normalises
each *unit*: a k×k window of all channels. A ViT's patch tokens (N, L, D) come from an (h, w) grid
of image patches, so the natural unit is a k×k window of neighbouring tokens × all D channels
(DESIGN.md §4). With stride = kernel the windows tile the grid and the sequence keeps its shape;
k = 1 normalises every token on its own (LayerNorm without affine). Leading class / register
tokens have no grid position: each is normalised on its own D channels.

As in KernelNorm2d, statistics come from an inverted-dropout copy of the input while the clean
input is normalised; there are no affine parameters and no running buffers. The official code
keeps that dropout on in eval; here eval is deterministic unless `eval_dropout=True`.

`KernelNormEmbedGrid` is the comparison point of the seed project (a CPSC 440 KN-ViT): each
token's D-dim embedding is reshaped to a 2-D grid and KernelNorm runs in 2×2 windows of that grid
with the L tokens as channels, so every unit spans the whole sequence.
"""

import math
from contextlib import nullcontext

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kn_dist.layers.dropout_draws import draw_dropped
from kn_dist.layers.kernel_norm import autocast_on, drop_plan
from kn_dist.layers.kn_conv_function import drop_sums, stats_dtype


def _check_dropout(p: float, layer: str) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{layer}: dropout_p={p} is outside [0, 1)")


def _var_mean(d: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Biased variance and mean over `dim`, two-pass (stable), keepdim.

    Same result as torch.var_mean, which on CPU is ~20× slower than a mean plus a dot product here.
    """
    mu = d.mean(dim=dim, keepdim=True)
    c = d - mu
    return torch.linalg.vecdot(c, c, dim=dim).unsqueeze(dim) / d.shape[dim], mu


def _unit_mean(t: Tensor, geometry: tuple[int, int, int, int]) -> Tensor:
    """Per-position values t, (N, P, 1) or (N, 1, P) -> the mean over each position's unit, same shape.

    The first p positions are their own unit (prefix tokens); the h·w grid positions after them, in
    row-major order, share the value of their k×k window.
    """
    p, h, w, k = geometry
    if k == 1:
        return t
    n = t.shape[0]
    flat = t.reshape(n, -1)
    win = flat[:, p:].reshape(n, h // k, k, w // k, k).mean(dim=(2, 4), keepdim=True)  # (N, h/k, 1, w/k, 1)
    grid = win.expand(n, h // k, k, w // k, k).reshape(n, h * w)
    return torch.cat([flat[:, :p], grid], dim=1).view(t.shape)


class _GridKernelNorm(torch.autograd.Function):
    """y = (x - mu) * r per unit, with mu and r = (var + eps)^-1/2 of the dropped-out copy d = scale * x * keep.

    x (N, L, D) is read as positions × depth: `dim` = 2, positions are the L tokens and each has D values
    (KernelNormTokens); `dim` = 1, positions are the D channels, each with L values (KernelNormEmbedGrid).
    A unit is a set of positions (`geometry`, `_unit_mean`) × their whole depth.

    The drop comes as flat indices (CPU: the sparse form of `draw_dropped`), a bool mask (True = dropped)
    or None. With flat indices no input-sized mask is built: per-position mean m and variance v of x
    (two-pass) are corrected for the position's dropped elements, q = -sum_d x_d / depth and s2 =
    -sum_d x_d^2 / depth in float64: mean(d) = scale (m + q), var(d) = scale^2 (v + s2 - 2 m q - q^2).
    Units then combine their positions by the law of total variance, var = mean(var_t) +
    mean((mu_t - mu)^2), which avoids the one-pass E[x^2] - mu^2.

    A hand-written backward (two per-position reductions, two elementwise passes) instead of autograd
    through the statistics, which costs several times more on CPU: with n elements per unit, A = sum(g) / n
    and B = sum(g * y) / n over the unit, and scale x - mu = scale (x - mu) + (scale - 1) mu,
        dx = r * (g - keep * scale * (A + r * (scale x - mu) * B)) = r g + keep * (c0 + c1 * y),
        c1 = -r scale^2 B,   c0 = -r scale (A + r (scale - 1) mu B),
    which for keep = 1, scale = 1 is the familiar LayerNorm gradient r (g - A - y B). Checked by gradcheck;
    the sparse path against the naive windows (tests/layers/test_kernel_norm_tokens.py).
    """

    @staticmethod
    def forward(ctx, x: Tensor, dropped: Tensor | None, scale: float, geometry: tuple, eps: float, dim: int) -> Tensor:
        y, mu, r, ctx.sparse = grid_forward(x, dropped, scale, geometry, eps, dim)
        ctx.save_for_backward(x, dropped, mu, r)
        ctx.geometry, ctx.scale, ctx.dim = geometry, scale, dim
        return y

    @staticmethod
    @once_differentiable  # mu and r are saved without their graph: no double backward
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        x, dropped, mu, r = ctx.saved_tensors
        dx = grid_backward(grad, x, dropped, mu, r, ctx.sparse, ctx.scale, ctx.geometry, ctx.dim)
        return dx, None, None, None, None, None


def grid_forward(x: Tensor, dropped: Tensor | None, scale: float, geometry: tuple, eps: float, dim: int):
    """Forward of `_GridKernelNorm`: (y in x's dtype, mu, r per position, sparse (position, value) or None)."""
    xf = x.to(stats_dtype(x))  # statistics in fp32, also under autocast
    sparse = None
    if dropped is not None and dropped.dtype == torch.bool:
        var_t, mu_t = _var_mean(xf.masked_fill(dropped, 0.0) * scale, dim)  # per position
    else:
        var_t, mu_t = _var_mean(xf, dim)
        if dropped is not None:
            mu_t, var_t, sparse = _drop_corrected(xf, dropped, scale, mu_t, var_t, dim)
    mu = _unit_mean(mu_t, geometry)
    var = _unit_mean(var_t + (mu_t - mu).square(), geometry)
    r = torch.rsqrt(var + eps)
    # (x - mu) * r, not x r - mu r: a large common offset cancels exactly in x - mu (issue 24)
    return (xf - mu).mul_(r).to(x.dtype), mu, r, sparse


def grid_backward(grad, x, dropped, mu, r, sparse, scale: float, geometry: tuple, dim: int) -> Tensor:
    """Backward of `_GridKernelNorm` (its docstring): dx in x's dtype."""
    xf = x.to(r.dtype)
    g = grad.to(r.dtype)
    depth = g.shape[dim]
    y = (xf - mu).mul_(r)
    a = _unit_mean(g.sum(dim=dim, keepdim=True) / depth, geometry)  # per position
    b = _unit_mean(torch.linalg.vecdot(g, y, dim=dim).unsqueeze(dim) / depth, geometry)
    c1 = r * b * (-scale * scale)
    c0 = (r * (scale - 1.0) * mu).mul_(b).add_(a).mul_(r).mul_(-scale)
    dx = torch.addcmul(c0, y, c1)  # the statistics' part, every element
    if dropped is not None and dropped.dtype == torch.bool:
        dx.masked_fill_(dropped, 0.0)
    dx.addcmul_(g, r)
    if sparse is not None:  # dropped elements: no part in the statistics, dx = r g
        pos, xd = sparse
        rows = torch.stack([c0, c1 * r, mu], dim=-1).view(-1, 3).index_select(0, pos)  # (D, 3)
        share = torch.addcmul(rows[:, 0], rows[:, 1], xd.to(r.dtype) - rows[:, 2])
        dx.view(-1).scatter_add_(0, dropped, share.neg_())
    return dx.to(x.dtype)


@torch.library.custom_op("kn_dist::grid_kernel_norm", mutates_args=())
def _grid_fwd(
    x: Tensor, dropped: Tensor | None, scale: float, geometry: list[int], eps: float, dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """_GridKernelNorm as one custom op for torch.compile (`kn_ops`), with a dense drop mask: (y, mu, r)."""
    with torch.autocast(x.device.type, enabled=False):
        y, mu, r, _ = grid_forward(x, dropped, scale, tuple(geometry), eps, dim)
    return y, mu, r


@_grid_fwd.register_fake
def _(x, dropped, scale, geometry, eps, dim):
    shape = list(x.shape)
    shape[dim] = 1
    mu = x.new_empty(shape, dtype=stats_dtype(x))
    return torch.empty_like(x), mu, torch.empty_like(mu)


@torch.library.custom_op("kn_dist::grid_kernel_norm_backward", mutates_args=())
def _grid_bwd(
    grad: Tensor, x: Tensor, dropped: Tensor | None, mu: Tensor, r: Tensor, scale: float, geometry: list[int], dim: int
) -> Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return grid_backward(grad, x, dropped, mu, r, None, scale, tuple(geometry), dim)


@_grid_bwd.register_fake
def _(grad, x, dropped, mu, r, scale, geometry, dim):
    return torch.empty_like(x)


def _grid_setup(ctx, inputs, output) -> None:
    x, dropped, scale, geometry, _eps, dim = inputs
    _, mu, r = output
    ctx.conf = (scale, geometry, dim)
    ctx.save_for_backward(x, dropped, mu, r)


def _grid_grad(ctx, grad, *_unused):
    x, dropped, mu, r = ctx.saved_tensors
    scale, geometry, dim = ctx.conf
    return _grid_bwd(grad, x, dropped, mu, r, scale, geometry, dim), None, None, None, None, None


_grid_fwd.register_autograd(_grid_grad, setup_context=_grid_setup)


def grid_kernel_norm(x: Tensor, dropped: Tensor | None, scale: float, geometry: tuple, eps: float, dim: int) -> Tensor:
    """(x - mu) * r per unit: the autograd function eagerly, one custom op under torch.compile (`kn_ops`)."""
    if torch.compiler.is_compiling():
        return _grid_fwd(x, dropped, scale, list(geometry), eps, dim)[0]
    # autocast off: it would run the statistics' vecdot in bf16 (0.0075 x the output's std off for a
    # 1000 + randn input under CPU bf16 autocast; issue 24)
    with torch.autocast(x.device.type, enabled=False) if autocast_on(x) else nullcontext():
        return _GridKernelNorm.apply(x, dropped, scale, geometry, eps, dim)


def _drop_corrected(xf: Tensor, dropped: Tensor, scale: float, mu_t: Tensor, var_t: Tensor, dim: int):
    """Per-position (mean, variance) of scale * x * keep from those of x and the dropped elements' flat indices.

    x (N, L, D) is KNConv2d's (N, C, positions) with C = the depth: for `dim` = 2 in channels-last order,
    for `dim` = 1 in channel-first order, so `drop_sums` gives the per-position corrections. Returns both
    in the shape and dtype of mu_t, and (position index, value) of each dropped element.
    """
    xs = xf.mT if dim == 2 else xf  # (N, depth, positions), a view
    q, s2, pos, xd = drop_sums(xs, dropped, channels_last=dim == 2)
    q, s2 = q.view(mu_t.shape), s2.view(mu_t.shape)
    m = mu_t.to(torch.float64)
    mean = (m + q).mul_(scale)
    var = (var_t.to(torch.float64) + s2).addcmul_(m, q, value=-2.0).sub_(q.square()).mul_(scale * scale).clamp_min_(0.0)
    return mean.to(xf.dtype), var.to(xf.dtype), (pos, xd)


def _drop(x: Tensor, keep_mask: Tensor | None, dropout_p: float, active: bool) -> tuple[Tensor | None, float]:
    """(dropped: flat indices on CPU, else a bool mask, or None; the inverted-dropout scale)."""
    drop, draw_p, scale = drop_plan(keep_mask, dropout_p, active)
    if draw_p > 0:
        drop = draw_dropped(x, draw_p)  # flat indices on CPU (no mask built), else a bool mask
    return drop, scale


class KernelNormTokens(nn.Module):
    """KernelNorm over k×k windows of grid tokens × all D channels; prefix tokens per token.

    Input and output (N, L, D) with L = num_prefix_tokens + h·w, tokens in row-major grid order.
    `grid_size` (h, w) may be given up front; otherwise the grid is taken as square.
    Only non-overlapping windows (stride = kernel_size) are supported: they keep the sequence;
    overlapping windows would change the number of tokens.
    """

    def __init__(
        self,
        kernel_size: int = 2,
        stride: int | None = None,
        dropout_p: float = 0.05,
        eps: float = 1e-5,
        num_prefix_tokens: int = 1,
        grid_size: tuple[int, int] | None = None,
        eval_dropout: bool = False,
    ) -> None:
        super().__init__()
        stride = kernel_size if stride is None else stride
        name = type(self).__name__
        if kernel_size < 1:
            raise ValueError(f"{name}: kernel_size={kernel_size} must be ≥ 1")
        if stride != kernel_size:
            raise ValueError(
                f"{name}: stride={stride} must equal kernel_size={kernel_size}; only non-overlapping token "
                "windows keep the sequence length"
            )
        if num_prefix_tokens < 0:
            raise ValueError(f"{name}: num_prefix_tokens={num_prefix_tokens} must be ≥ 0")
        _check_dropout(dropout_p, name)
        self.kernel_size = kernel_size
        self.dropout_p = dropout_p
        self.eps = eps
        self.num_prefix_tokens = num_prefix_tokens
        self.eval_dropout = eval_dropout
        self.grid_size = None
        if grid_size is not None:
            self.grid_size = (int(grid_size[0]), int(grid_size[1]))
            self._check_grid(*self.grid_size)

    def _check_grid(self, h: int, w: int) -> None:
        k = self.kernel_size
        if h % k or w % k:
            raise ValueError(
                f"{type(self).__name__}: kernel_size={k} does not tile the {h}×{w} token grid; "
                f"use a kernel size that divides both {h} and {w} (1 always does)"
            )

    def _grid(self, num_grid_tokens: int) -> tuple[int, int]:
        if self.grid_size is not None:
            h, w = self.grid_size
            if h * w != num_grid_tokens:
                raise ValueError(
                    f"{type(self).__name__}: got {num_grid_tokens} grid tokens, expected {h}×{w} = {h * w}"
                )
            return h, w
        side = math.isqrt(num_grid_tokens)
        if side * side != num_grid_tokens:
            raise ValueError(
                f"{type(self).__name__}: {num_grid_tokens} grid tokens do not form a square grid; pass grid_size"
            )
        self._check_grid(side, side)
        return side, side

    def forward(self, x: Tensor, keep_mask: Tensor | None = None) -> Tensor:
        """x: (N, L, D) -> (N, L, D). `keep_mask` (bool, shape of x, True = kept) replaces the random draw."""
        p = self.num_prefix_tokens
        h, w = self._grid(x.shape[1] - p)
        x = x.contiguous()  # flat drop indices and the sparse corrections address x in row-major order
        dropped, scale = _drop(x, keep_mask, self.dropout_p, self.training or self.eval_dropout)
        return grid_kernel_norm(x, dropped, scale, (p, h, w, self.kernel_size), self.eps, 2)

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, dropout_p={self.dropout_p}, eps={self.eps}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, grid_size={self.grid_size}, eval_dropout={self.eval_dropout}"
        )


def embed_grid_shape(dim: int, kernel_size: int) -> tuple[int, int]:
    """The most nearly square (a, b), a ≤ b, a·b = dim, both divisible by `kernel_size`.

    The seed project picked D = 784 = 28² so the embedding is square; ViT widths such as 192, 384
    and 768 are not squares, so we use the closest rectangle (192 → 12×16, 768 → 24×32).
    """
    for a in range(math.isqrt(dim), 0, -1):
        if dim % a == 0 and a % kernel_size == 0 and (dim // a) % kernel_size == 0:
            return a, dim // a
    raise ValueError(
        f"KernelNormEmbedGrid: embedding dim {dim} has no a×b grid with both sides divisible by {kernel_size}"
    )


class KernelNormEmbedGrid(nn.Module):
    """The seed project's KN-ViT norm: (N, L, D) → (N, L, a, b), KernelNorm k×k / k with L as channels.

    Each unit is a k×k patch of the embedding grid across all L tokens (the whole sequence), so
    every token's output depends on every other token of the same sample, never on other samples.
    """

    def __init__(
        self, dim: int, kernel_size: int = 2, dropout_p: float = 0.05, eps: float = 1e-5, eval_dropout: bool = False
    ) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"KernelNormEmbedGrid: kernel_size={kernel_size} must be ≥ 1")
        _check_dropout(dropout_p, "KernelNormEmbedGrid")
        self.grid = embed_grid_shape(dim, kernel_size)
        self.kernel_size = kernel_size
        self.dropout_p = dropout_p
        self.eps = eps
        self.eval_dropout = eval_dropout

    def forward(self, x: Tensor, keep_mask: Tensor | None = None) -> Tensor:
        """x: (N, L, D) -> (N, L, D). `keep_mask` (bool, shape of x, True = kept) replaces the random draw."""
        (a, b), k = self.grid, self.kernel_size
        x = x.contiguous()  # flat drop indices and the sparse corrections address x in row-major order
        dropped, scale = _drop(x, keep_mask, self.dropout_p, self.training or self.eval_dropout)
        # positions: the D channels on the (a, b) grid, each with its L token values
        return grid_kernel_norm(x, dropped, scale, (0, a, b, k), self.eps, 1)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, kernel_size={self.kernel_size}, dropout_p={self.dropout_p}, eps={self.eps}"
