"""Model registry: short entrypoints register themselves; `create_model` builds one by name.

A norm is chosen by name only here, at the edge (STYLE.md habit 1): each entrypoint receives the
validated norm string and turns it into layers with `kn_dist.layers.get_norm_layer`.

An entrypoint is `fn(norm, num_classes, args)` where `args` is annotated with a frozen dataclass of
the keyword arguments it takes (`kn_dist.models._options`): `create_model` builds that dataclass from
its keyword arguments, refusing unknown ones. A plain `fn(norm, num_classes, option=default, ...)` works
too; its named parameters are then the valid keyword arguments (a bare **kwargs is refused: it would
let unknown keys through). `register_alias` gives a registered model a second name.
"""

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kn_dist.layers import KNConv2d


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one model name."""

    name: str
    family: str
    norms: tuple[str, ...]  # every norm the entrypoint accepts
    default_norm: str  # the normalisation the architecture was published with
    input_size: int  # the square input resolution the model is built for
    num_classes: int  # default head size (1000 for ImageNet-size, 10 for CIFAR-size)
    fn: Callable[..., nn.Module]
    # smallest cheap square input the registry-driven tests may use (None: input_size); for
    # ImageNet-size models whose geometry also works at e.g. 64 px, so CPU tests stay fast
    test_input_size: int | None = None
    arguments: tuple[str, ...] = ()  # the keyword arguments create_model accepts besides norm / num_classes
    args_type: type | None = None  # the dataclass the entrypoint's `args` parameter is built as (None: plain)
    alias_of: str | None = None  # `register_alias`: the model this name builds (with its one norm)


_MODELS: dict[str, ModelInfo] = {}


def register_model(
    *,
    family: str,
    norms: tuple[str, ...],
    default_norm: str,
    input_size: int,
    num_classes: int | None = None,
    test_input_size: int | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register `fn(norm: str, num_classes: int, args: SomeArgs) -> nn.Module` under its name.

    `test_input_size` (optional) is a smaller input at which the model's geometry still works; the
    registry-driven tests use it instead of `input_size` to keep CPU tests cheap.
    """
    if default_norm not in norms:
        raise ValueError(f"default norm {default_norm!r} is not among the supported norms {norms}")

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered; model names must be unique")
        classes = num_classes if num_classes is not None else (1000 if input_size >= 128 else 10)
        args_type, arguments = _arguments(fn)
        _MODELS[name] = ModelInfo(
            name, family, tuple(norms), default_norm, input_size, classes, fn, test_input_size, arguments, args_type
        )
        return fn

    return decorator


def register_alias(name: str, target: str, norm: str, doc: str) -> Callable[..., nn.Module]:
    """Register `name` as registered model `target` built with `norm` only (knresnet18 = resnet18 with "kn").

    The alias takes the target's keyword arguments, sizes and head; `doc` is its one-line description.
    """
    info = model_info(target)
    if norm not in info.norms:
        raise ValueError(f"alias {name!r}: model {target!r} has no norm {norm!r}")

    def entrypoint(norm: str, num_classes: int, **kwargs) -> nn.Module:
        return info.fn(norm=norm, num_classes=num_classes, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = doc
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered; model names must be unique")
    _MODELS[name] = dataclasses.replace(
        info, name=name, norms=(norm,), default_norm=norm, fn=entrypoint, alias_of=target
    )
    return entrypoint


def list_models(family: str | None = None) -> list[str]:
    """Registered model names, sorted; only one family's when `family` is given."""
    return sorted(n for n, info in _MODELS.items() if family is None or info.family == family)


def model_info(name: str) -> ModelInfo:
    """The registry entry for `name`; a ValueError listing the valid names otherwise."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid models are: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, norm: str | None = None, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Build model `name` with normalisation `norm` (None: the published one).

    Extra keyword arguments go to the entrypoint (e.g. KernelNorm kernel size / dropout), so a
    sweep can search them; an unknown one, or geometry that cannot work, is a ValueError.
    """
    info = model_info(name)
    norm = info.default_norm if norm is None else norm
    if norm not in info.norms:
        raise ValueError(f"model {name!r} does not support norm {norm!r}; valid norms are: {', '.join(info.norms)}")
    unknown = sorted(set(kwargs) - set(info.arguments))
    if unknown:
        raise ValueError(
            f"model {name!r} has no argument {', '.join(map(repr, unknown))}; valid arguments are: "
            f"{', '.join(info.arguments) or '(none)'}"
        )
    num_classes = info.num_classes if num_classes is None else num_classes
    if info.args_type is not None:
        return info.fn(norm=norm, num_classes=num_classes, args=info.args_type(**kwargs))
    return info.fn(norm=norm, num_classes=num_classes, **kwargs)


def _arguments(fn: Callable[..., nn.Module]) -> tuple[type | None, tuple[str, ...]]:
    """(the dataclass of fn's `args` parameter or None, the keyword arguments create_model accepts)."""
    args_type = typing.get_type_hints(fn).get("args")
    if dataclasses.is_dataclass(args_type):
        return args_type, tuple(f.name for f in dataclasses.fields(args_type))
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"entrypoint {fn.__name__}: declare its options (an `args` dataclass), not **kwargs")
    return None, tuple(n for n in params if n not in ("norm", "num_classes"))


def check_geometry(build: Callable[[], nn.Module], input_size: int, model: str) -> None:
    """Refuse a model whose layers cannot process a (1, 3, input_size, input_size) input.

    `build()` is run on the meta device (no memory, no init cost) and one forward pass is traced
    there; the first layer that fails (a kernel larger than its padded input, a map pooled to zero)
    is named in a ValueError together with the input it got.
    """
    with torch.device("meta"):
        probe = shape_probe(build())
    _trace(probe, input_size, model)


def shape_probe(model: nn.Module) -> nn.Module:
    """Make a throwaway meta-device copy of a model runnable: its KNConv2d layers run as their Conv2d.

    A KNConv2d's output shape, its geometry limits and its conv FLOPs are exactly its convolution's
    (DESIGN.md §3: y = (conv(x~, W, s) - mu * sum W) / sigma + b); its forward, though, asks for the
    autocast state of the input's device, which the meta device does not have.
    """
    for module in model.modules():
        if isinstance(module, KNConv2d):
            module.forward = functools.partial(_conv_only, module)
    return model.eval()


def _conv_only(module: KNConv2d, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A KNConv2d's convolution alone; extra inputs (a keep mask, a KNConcatConv2d's statistics) are unused."""
    return nn.Conv2d.forward(module, x)


def _trace(probe: nn.Module, input_size: int, model: str) -> None:
    """One forward pass with hooks that keep the stack of layers entered and not yet left."""
    stack: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    handles = []
    for layer_name, module in probe.named_modules():
        if layer_name:
            handles.append(module.register_forward_pre_hook(_push(stack, layer_name, module)))
            handles.append(module.register_forward_hook(_pop(stack)))
    try:
        with torch.no_grad():
            probe(torch.empty(1, 3, input_size, input_size, device="meta"))
    except (RuntimeError, ValueError) as err:
        if not stack:
            raise
        layer_name, module, shape = stack[-1]
        raise ValueError(
            f"{model}: layer {layer_name!r} ({module.__class__.__name__}) cannot take its {shape[-2]}x{shape[-1]} "
            f"feature map at input size {input_size}: {err}"
        ) from None
    finally:
        for handle in handles:
            handle.remove()


def _pop(stack: list) -> Callable:
    def hook(*_) -> None:  # a forward hook must return None, or it would replace the output
        stack.pop()

    return hook


def _push(stack: list, layer_name: str, module: nn.Module) -> Callable:
    def hook(_module: nn.Module, args: tuple) -> None:
        shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else (0, 0)
        stack.append((layer_name, module, shape))

    return hook
