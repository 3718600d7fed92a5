"""Pass 1b: the order in which a model's convs run, read without changing the model.

Children are always put in place in the user's own module tree (passes.swapping), so no trace builds the
result: a trace is only *read*, for the order of the convs (the first member of a family is its parent). With
example inputs the order is the one in which the conv modules ran on them; else the order of the conv calls in
a torch.fx trace of the model; else (the model does not trace) registration order. A wrong trace can then only
change which member of a family is its parent, never what the model computes. Reading never changes a module's
train/eval mode (utils.KeptModes).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdna_fx.config import KDNAConfig
from kdna_fx.datamodel import Skipped
from kdna_fx.errors import KDNAError, KDNATraceError
from kdna_fx.utils import KeptModes

from .sites import functional_conv
from .tracing import trace

@dataclass
class Example:
    """Example inputs: ``model(*args, **kwargs)`` runs the model (the convention of torch.export)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, example_inputs: Any, example_kwargs: dict[str, Any] | None = None) -> "Example | None":
        """A tuple is the positional arguments; anything else (a tensor, a list of images) is the one argument."""
        if example_inputs is None and not example_kwargs:
            return None
        args = () if example_inputs is None else (
            example_inputs if isinstance(example_inputs, tuple) else (example_inputs,))
        return cls(args, dict(example_kwargs or {}))


@dataclass
class Route:
    """The conv module names in run order (``by``: "example inputs", "trace" or "registration", then empty),
    and the F.conv2d calls a trace found (left alone: only modules are shared)."""

    order: list[str]
    by: str
    functional: list[Skipped]


def route(model: nn.Module, config: KDNAConfig, example: Example | None = None) -> Route:
    """The order of ``model``'s convs (see the module docstring); the model is left as it was."""
    with KeptModes(model):
        try:
            gm = trace(model, config)
        except KDNATraceError:
            gm = None
    modules = dict(model.named_modules())
    # An F.conv2d inside a conv module's own forward (a subclass that overrides it) is that module's site.
    functional = [] if gm is None else [
        s for node in gm.graph.nodes if (s := functional_conv(gm, node)) is not None
        and not isinstance(modules.get(s.name.rpartition(".")[0]), nn.modules.conv._ConvNd)]
    if example is not None:
        return Route(_run_order(model, example)[0], "example inputs", functional)
    if gm is None:
        return Route([], "registration", functional)
    order = [n.target for n in gm.graph.nodes if n.op == "call_module"
             and isinstance(gm.get_submodule(n.target), nn.modules.conv._ConvNd)]
    return Route(list(dict.fromkeys(order)), "trace", functional)


def run(module: nn.Module, example: Example) -> Any:
    """``module`` on ``example`` in eval mode, without gradients, with a fixed seed; every mode kept."""
    with KeptModes(module), torch.no_grad(), torch.random.fork_rng(devices=[]):
        module.eval()
        torch.manual_seed(0)
        return module(*example.args, **example.kwargs)


def _run_order(model: nn.Module, example: Example) -> tuple[list[str], Any]:
    """Conv module names in the order they first ran in one eval-mode forward of the example inputs, and that
    forward's output."""
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, i, name=name: order.append(name))
             for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    try:
        output = run(model, example)
    except Exception as exc:  # noqa: BLE001 - the user's inputs do not fit the user's model: say so, once
        raise KDNAError(f"the example inputs do not run through {type(model).__name__} itself (before any "
                        f"change): {type(exc).__name__}: {exc}. Pass example_inputs the model's forward takes: "
                        f"a tuple of its positional arguments, plus example_kwargs if it needs keywords.") from exc
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order)), output


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 1e-2)


def compare(expected: Any, got: Any, where: str) -> str | None:
    """How ``got`` differs from ``expected`` (tensors within a dtype's tolerance, containers by structure), else
    None."""
    if isinstance(expected, Tensor):
        if not isinstance(got, Tensor) or got.shape != expected.shape or got.dtype != expected.dtype:
            shown = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
            return f"{where} is {shown} where the model gives {tuple(expected.shape)}"
        if expected.is_floating_point() or expected.is_complex():
            scale = float(expected.abs().max()) if expected.numel() else 0.0
            diff = float((got - expected).abs().max()) if expected.numel() else 0.0
            if not diff <= _tolerance(expected.dtype) * max(scale, 1e-6):  # also catches NaN
                return f"{where} differs by {diff:.3g} (largest value {scale:.3g})"
        elif not torch.equal(expected, got):
            return f"{where} differs"
        return None
    if isinstance(expected, dict) or (hasattr(expected, "keys") and hasattr(expected, "__getitem__")):
        keys = list(expected.keys())
        if not hasattr(got, "keys") or list(got.keys()) != keys:
            return f"{where} has other keys"
        return next((w for k in keys if (w := compare(expected[k], got[k], f"{where}[{k!r}]"))), None)
    if dataclasses.is_dataclass(expected) and not isinstance(expected, type):
        return compare(dataclasses.asdict(expected), dataclasses.asdict(got) if dataclasses.is_dataclass(got)
                       else got, where)
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected) or type(got) is not type(expected):
            return f"{where} is a {type(got).__name__} where the model gives a {type(expected).__name__} of " \
                   f"{len(expected)}"
        return next((w for i, (e, g) in enumerate(zip(expected, got)) if (w := compare(e, g, f"{where}[{i}]"))), None)
    return None if expected == got else f"{where} is {got!r}, not {expected!r}"
