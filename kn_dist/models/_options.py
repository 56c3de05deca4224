"""Keyword arguments shared by a family's entrypoints, and the one KernelNorm check they all use.

An entrypoint declares the keyword arguments it takes by annotating its `args` parameter with one of
these frozen dataclasses; `create_model` builds that object from the keyword arguments it is given, so
an unknown key fails in one place with the valid ones listed (STYLE.md habit 3) and no entrypoint
repeats the list. None means "the default of this family / model" (the published value, in brackets).

`resolve_kn` turns the `kn_*` fields into a `KN`: refused for a norm without KernelNorm (no silently
ignored keys), checked, and filled with the family's defaults; `KN` then builds every KernelNorm layer
of the model, so `kn_dropout_p` and `kn_eval_dropout` reach all of them.
"""

from collections.abc import Callable
from dataclasses import dataclass, fields

from kn_dist.layers import KernelNorm2d, KNConv2d

Size2 = int | tuple[int, int]


@dataclass(frozen=True, kw_only=True)
class ModelArgs:
    """Options every family takes."""

    input_size: int | None = None  # square input the model is built / geometry-checked for [registered size]
    kn_dropout_p: float | None = None  # dropout on the statistics of the KernelNorm layers [family's]
    # keep that dropout on in eval() as the official code does (it calls F.dropout without training=)
    # [False: deterministic evaluation]
    kn_eval_dropout: bool | None = None


@dataclass(frozen=True, kw_only=True)
class CNNArgs(ModelArgs):
    """ResNet, DenseNet, ConvNeXt."""

    kn_kernel_size: int | None = None  # kernel of the KNConvs the family lets vary [family's]
    kn_head_dropout_p: float | None = None  # dropout of the final 1x1 KernelNorm [family's]


@dataclass(frozen=True, kw_only=True)
class ConvMixerArgs(ModelArgs):
    """ConvMixer: the architecture's own kernel and patch size may change with any norm."""

    kernel_size: int | None = None  # depthwise mixing kernel [published]
    patch_size: int | None = None  # patch-embedding kernel = stride [published]


@dataclass(frozen=True, kw_only=True)
class TransformerArgs(ModelArgs):
    """ViT and Conformer."""

    kn_kernel_size: int | None = None  # KernelNorm window on the token grid (or embedding grid) [2]
    kn_stride: int | None = None  # must equal kn_kernel_size: non-overlapping windows keep the sequence
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path_rate: float | None = None  # stochastic depth [model's: 0 unless its publication trained with it]


@dataclass(frozen=True)
class KN:
    """Resolved KernelNorm settings of one model; builds its KernelNorm layers."""

    kernel_size: int
    stride: int | None
    dropout_p: float
    head_dropout_p: float
    eval_dropout: bool

    def conv(
        self, cin: int, cout: int, kernel_size: Size2, stride: Size2 = 1, padding: Size2 = 0, groups: int = 1
    ) -> KNConv2d:
        """A KNConv2d (always with bias: nothing after it re-centres the output)."""
        return KNConv2d(
            cin, cout, kernel_size, stride=stride, padding=padding, groups=groups, dropout_p=self.dropout_p,
            eval_dropout=self.eval_dropout,
        )  # fmt: skip

    def norm(self, kernel_size: Size2, stride: Size2 = 1) -> KernelNorm2d:
        """A KernelNorm2d with the statistics dropout."""
        return KernelNorm2d(kernel_size, stride, dropout_p=self.dropout_p, eval_dropout=self.eval_dropout)

    def head(self) -> KernelNorm2d:
        """The final 1x1 KernelNorm, with the head dropout."""
        return KernelNorm2d(1, dropout_p=self.head_dropout_p, eval_dropout=self.eval_dropout)


def resolve_kn(
    model: str,
    norm: str,
    args: ModelArgs,
    kn_norms: tuple[str, ...],
    *,
    kernel_size: int = 2,
    min_kernel_size: int = 1,
    dropout_p: float = 0.05,
    head_dropout_p: float | Callable[[float], float] = 0.0,
    head_norms: tuple[str, ...] | None = None,
) -> KN:
    """Check the `kn_*` fields of `args` and fill in the family's defaults (the keyword arguments here).

    `kn_norms`: the norms that use KernelNorm; a `kn_*` value given with another norm is refused.
    `head_norms`: the norms with a KernelNorm head (default: all of `kn_norms`); `head_dropout_p` may be
    a function of the resolved statistics dropout (KNResNet: `min(5 p, 0.25)`).
    """
    given = [f.name for f in fields(args) if f.name.startswith("kn_") and getattr(args, f.name) is not None]
    _refuse(model, norm, kn_norms, [k for k in given if k != "kn_head_dropout_p"])
    _refuse(model, norm, head_norms or kn_norms, [k for k in given if k == "kn_head_dropout_p"])
    k = _or(getattr(args, "kn_kernel_size", None), kernel_size)
    if not isinstance(k, int) or isinstance(k, bool) or k < min_kernel_size:
        raise ValueError(f"{model}: kn_kernel_size={k!r} must be an int >= {min_kernel_size} (default {kernel_size})")
    eval_dropout = _or(args.kn_eval_dropout, False)
    if not isinstance(eval_dropout, bool):
        raise ValueError(f"{model}: kn_eval_dropout={eval_dropout!r} must be true or false")
    p = _or(args.kn_dropout_p, dropout_p)
    head_default = head_dropout_p(p) if callable(head_dropout_p) else head_dropout_p
    hp = _or(getattr(args, "kn_head_dropout_p", None), head_default)
    return KN(k, getattr(args, "kn_stride", None), p, hp, eval_dropout)


def _or(value, default):
    return default if value is None else value


def _refuse(model: str, norm: str, kn_norms: tuple[str, ...], given: list[str]) -> None:
    if given and norm not in kn_norms:
        raise ValueError(
            f"{model}: KernelNorm argument(s) {', '.join(given)} apply only to norm "
            f"{' or '.join(map(repr, kn_norms))}, not norm {norm!r}"
        )
