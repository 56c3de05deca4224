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

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kn_dist.layers.kernel_norm import dropout_keep_mask


def _check_dropout(p: float, layer: str) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{layer}: dropout_p={p} is outside [0, 1)")


def _stats_dtype(x: Tensor) -> torch.dtype:
    # fp32 statistics for half / bf16 inputs, also under autocast; fp64 stays fp64 (gradcheck)
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dropped(x: Tensor, p: float, active: bool, keep_mask: Tensor | None) -> Tensor:
    """Inverted-dropout copy of x for the statistics: one mask draw per element, as in KernelNorm2d."""
    if keep_mask is None:
        if not (active and p > 0):
            return x
        keep_mask = dropout_keep_mask(x, p)
    return x * keep_mask * (1.0 / (1.0 - p))


def _var_mean_last(d: Tensor) -> tuple[Tensor, Tensor]:
    """Biased variance and mean over the last dim, two-pass (stable), keepdim.

    Same result as torch.var_mean, which on CPU is ~20× slower than a mean plus a dot product here.
    """
    mu = d.mean(dim=-1, keepdim=True)
    c = d - mu
    return torch.linalg.vecdot(c, c).unsqueeze(-1) / d.shape[-1], mu


def _unit_mean(t: Tensor, geometry: tuple[int, int, int, int]) -> Tensor:
    """Per-token values t (N, L, 1) -> the mean over each token's unit, broadcast back to (N, L, 1).

    Prefix tokens are their own unit; grid tokens share the value of their k×k window.
    """
    p, h, w, k = geometry
    if k == 1:
        return t
    n = t.shape[0]
    win = t[:, p:].reshape(n, h // k, k, w // k, k).mean(dim=(2, 4), keepdim=True)  # (N, h/k, 1, w/k, 1)
    grid = win.expand(n, h // k, k, w // k, k).reshape(n, h * w, 1)
    return torch.cat([t[:, :p], grid], dim=1)


class _TokenKernelNorm(torch.autograd.Function):
    """y = (x - mu) * r per unit, with mu and r = (var + eps)^-1/2 of the dropped-out copy d = x * m.

    A hand-written backward (two per-token reductions, a few elementwise passes) instead of autograd
    through the statistics, which costs several times more on CPU: with n elements per unit,
    A = sum(g) / n and B = sum(g * y) / n over the unit,
        dx = r * (g - m * (A + r * (d - mu) * B)),
    which for m = 1 is the familiar LayerNorm gradient r * (g - A - y * B). Checked by gradcheck.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor | None, geometry: tuple[int, int, int, int], eps: float) -> Tensor:
        xf = x.to(_stats_dtype(x))  # statistics in fp32, also under autocast
        d = xf if scale is None else xf * scale
        # Per-token statistics first (two-pass, stable); units then combine them by the law of total
        # variance, var = mean(var_t) + mean((mu_t - mu)^2), which avoids the one-pass E[x²] − μ².
        var_t, mu_t = _var_mean_last(d)  # (N, L, 1) each
        mu = _unit_mean(mu_t, geometry)
        var = _unit_mean(var_t + (mu_t - mu).square(), geometry)
        r = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, scale, mu, r)
        ctx.geometry = geometry
        return torch.addcmul(-mu * r, xf, r).to(x.dtype)  # (x - mu) * r in one pass

    @staticmethod
    @once_differentiable  # mu and r are saved without their graph: no double backward
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        x, scale, mu, r = ctx.saved_tensors
        xf = x.to(r.dtype)
        g = grad.to(r.dtype)
        d = g.shape[-1]
        y = torch.addcmul(-mu * r, xf, r)
        a = _unit_mean(g.sum(dim=-1, keepdim=True) / d, ctx.geometry)  # (N, L, 1)
        b = _unit_mean(torch.linalg.vecdot(g, y).unsqueeze(-1) / d, ctx.geometry)
        if scale is None:
            dx = r * (g - a - y * b)
        else:
            dx = r * (g - scale * (a + (torch.addcmul(-mu * r, xf * scale, r)) * b))
        return dx.to(x.dtype), None, None, None


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
        if keep_mask is None and self.dropout_p > 0 and (self.training or self.eval_dropout):
            keep_mask = dropout_keep_mask(x, self.dropout_p)
        scale = None if keep_mask is None else keep_mask * (1.0 / (1.0 - self.dropout_p))  # inverted dropout
        return _TokenKernelNorm.apply(x, scale, (p, h, w, self.kernel_size), self.eps)

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
        n, length, d = x.shape
        (a, b), k = self.grid, self.kernel_size
        xf = x.to(_stats_dtype(x))
        stats_src = _dropped(xf, self.dropout_p, self.training or self.eval_dropout, keep_mask)
        # per-channel statistics over the L tokens, then combined over each k×k cell window of the
        # (a, b) embedding grid by the law of total variance (a strided 6-D var_mean is much slower)
        mu_c = stats_src.mean(dim=1, keepdim=True)  # (N, 1, D); two-pass variance, as in _var_mean_last
        var_c = (stats_src - mu_c).square().mean(dim=1, keepdim=True)
        mu_g = mu_c.view(n, a // k, k, b // k, k)
        mu_w = mu_g.mean(dim=(2, 4), keepdim=True)  # (N, a/k, 1, b/k, 1)
        var_w = (var_c.view(n, a // k, k, b // k, k) + (mu_g - mu_w).square()).mean(dim=(2, 4), keepdim=True)
        shape = (n, a // k, k, b // k, k)
        mu = mu_w.expand(shape).reshape(n, 1, d)
        r = torch.rsqrt(var_w + self.eps).expand(shape).reshape(n, 1, d)
        out = (xf - mu) * r
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, kernel_size={self.kernel_size}, dropout_p={self.dropout_p}, eps={self.eps}"
