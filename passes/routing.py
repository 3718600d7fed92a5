"""Pass 1b: decide how children are put in place, graph rewrite or module swap (KDNAConfig.rewrite).

A rewritten graph is only as right as the trace it comes from. torch.fx symbolic tracing can fail (Python
control flow on tensor values), can bake in the train/eval mode the model was traced in (Python that reads
``self.training``), and can silently compute something else (a Python check that is False for a Proxy,
such as ``isinstance(x, torch.Tensor)``, drops a branch). So the graph path (passes.rewriting) is taken only
when the model traces as a whole, nothing that holds a shareable conv had to be kept opaque, the trace is
the same in train and eval mode, and, given example inputs, the trace computes what the model computes.
Otherwise the model takes the module-swap path (passes.swapping): its own objects and Python forward stay, and
its children are still shared. ``rewrite="graph"`` raises KDNATraceError instead; ``rewrite="swap"``
always swaps.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor, fx, nn

from kdna_fx.config import KDNAConfig
from kdna_fx.datamodel import Opaque
from kdna_fx.errors import KDNAError, KDNATraceError, PartialTraceWarning
from kdna_fx.utils import KeptModes

from .find import find_modules
from .tracing import trace

ASKED = "KDNAConfig(rewrite='swap') asks for the module swap"
"""The reason recorded when the swap was asked for: recorded, but not warned about."""

KEPT = {
    "leaf": "an opaque call inside the traced graph; it holds no conv to share",
    "swap": "the reason the model took the module-swap path; its convs are shared by module swap",
}


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
    """The decision: ``how`` ("graph" or "swap"), the traced graph for "graph", why (``opaque``), and the
    order in which the conv modules ran on the example inputs (empty without them)."""

    how: str
    gm: fx.GraphModule | None
    opaque: list[Opaque]
    order: list[str]
    checked: bool


def route(model: nn.Module, config: KDNAConfig, example: Example | None = None) -> Route:
    """Trace ``model`` and decide graph rewrite or module swap (see the module docstring)."""
    order, expected = _run_order(model, example) if example is not None else ([], None)
    name = type(model).__name__
    checked = example is not None
    if config.rewrite == "swap":
        return Route("swap", None, [Opaque("", name, "swap", ASKED)], order, checked)
    gm, leaves, why, error = _trusted_graph(model, config, example, expected)
    if not why:
        return Route("graph", gm, leaves, order, checked)
    if config.rewrite == "graph":
        if error is not None:
            raise error  # names the line of the model that stopped tracing
        raise KDNAError(f"KDNAConfig(rewrite='graph') cannot rewrite {name} as a graph: "
                        f"{'; '.join(o.describe() for o in why)}. Use rewrite='auto' (the default) or 'swap': the "
                        f"module swap shares the same convs.")
    return Route("swap", None, why, order, checked)


def _trusted_graph(model: nn.Module, config: KDNAConfig, example: Example | None,
                   expected: Any) -> tuple[fx.GraphModule | None, list[Opaque], list[Opaque], KDNATraceError | None]:
    """(the trace, its opaque leaves, why it cannot be used: empty when it can, the trace error behind that).
    Parts torch.fx cannot trace are kept as opaque leaves, one by one, as long as none holds a conv to share."""
    name = type(model).__name__
    leaves: dict[str, KDNATraceError] = {}
    while True:
        try:
            gm = trace(model, config, opaque=[model.get_submodule(n) for n in leaves])
            break
        except KDNATraceError as err:
            if err.module_name and err.module_name not in leaves:
                leaves[err.module_name] = err  # keep that instance opaque and trace again
                continue
            return None, [], [_opaque("", name, err)], err
    opaque = [_opaque(n, err.module_type, err, kept="leaf") for n, err in leaves.items()]
    shareable = [s.name for s in find_modules(model, config)[0]] if opaque else []
    holding = [o for o in opaque if any(n.startswith(o.path + ".") for n in shareable)]
    if holding:
        return None, [], [dataclasses.replace(o, kept="swap", reason=f"it could not be traced ({o.reason}); a graph "
                                              f"would keep it opaque, its convs unshared") for o in holding], \
            leaves[holding[0].path]
    why = _untrusted(model, config, gm, [model.get_submodule(n) for n in leaves], example, expected)
    if why is not None:
        return None, [], [Opaque("", name, "swap", why)], None
    return gm, opaque, [], None


def _opaque(path: str, type_name: str, err: KDNATraceError, kept: str = "swap") -> Opaque:
    cause = f"{type(err.__cause__).__name__}: " if err.__cause__ is not None else ""
    first_sentence = err.operation.split(". ")[0]  # torch.fx's messages go on with general advice
    reason = cause + first_sentence
    if kept == "swap":
        reason = f"torch.fx cannot trace its forward ({reason})"
    return Opaque(path, type_name, kept, reason, err.source)


# ---- the checks ---------------------------------------------------------------------------------------------
def _untrusted(model: nn.Module, config: KDNAConfig, gm: fx.GraphModule, leaves: list[nn.Module],
               example: Example | None, expected: Any) -> str | None:
    """Why the trace ``gm`` cannot stand for the model (it depends on the training mode, or differs from the
    model's own ``expected`` outputs on ``example``), else None."""
    why = _mode_dependent(model, config, gm, leaves)
    if why is None and example is not None:
        why = _differs(gm, example, expected)
    return why


def _mode_dependent(model: nn.Module, config: KDNAConfig, gm: fx.GraphModule, leaves: list[nn.Module]) -> str | None:
    """Why a graph would freeze the training mode (the model's trace differs between modes), else None."""
    with KeptModes(model):
        model.train(not model.training)
        other = trace(model, config, opaque=leaves)
    if other.code == gm.code:
        return None
    return ("its forward reads the training mode (self.training): the traced graph differs between train and "
            "eval mode, and a graph would keep the mode it was traced in")


def _run(module: nn.Module, example: Example) -> Any:
    with KeptModes(module), torch.no_grad(), torch.random.fork_rng(devices=[]):
        module.eval()
        torch.manual_seed(0)
        return module(*example.args, **example.kwargs)


def _run_order(model: nn.Module, example: Example) -> tuple[list[str], Any]:
    """Conv module names in the order they first ran in one eval-mode forward of the example inputs, and that
    forward's output (what a trace must reproduce)."""
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, i, name=name: order.append(name))
             for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    try:
        output = _run(model, example)
    except Exception as exc:  # noqa: BLE001 - the user's inputs do not fit the user's model: say so, once
        raise KDNAError(f"the example inputs do not run through {type(model).__name__} itself (before any "
                        f"change): {type(exc).__name__}: {exc}. Pass example_inputs the model's forward takes: "
                        f"a tuple of its positional arguments, plus example_kwargs if it needs keywords.") from exc
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order)), output


def _differs(gm: fx.GraphModule, example: Example, expected: Any) -> str | None:
    """How the trace's outputs on ``example`` (eval mode, same RNG) differ from the model's own ``expected``,
    else None."""
    try:
        with KeptModes(gm):
            got = _run(gm, example)
    except Exception as exc:  # noqa: BLE001 - any failure of the trace means it cannot be trusted
        return f"its trace fails on the example inputs where the model runs ({type(exc).__name__}: {str(exc)[:200]})"
    return _compare(expected, got, "output")


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 1e-2)


def _compare(expected: Any, got: Any, where: str) -> str | None:
    if isinstance(expected, Tensor):
        if not isinstance(got, Tensor) or got.shape != expected.shape or got.dtype != expected.dtype:
            shown = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
            return f"its trace computes something else: {where} is {shown} where the model gives {tuple(expected.shape)}"
        if expected.is_floating_point() or expected.is_complex():
            scale = float(expected.abs().max()) if expected.numel() else 0.0
            diff = float((got - expected).abs().max()) if expected.numel() else 0.0
            if not diff <= _tolerance(expected.dtype) * max(scale, 1e-6):  # also catches NaN
                return f"its trace computes something else: {where} differs by {diff:.3g} (largest value {scale:.3g})"
        elif not torch.equal(expected, got):
            return f"its trace computes something else: {where} differs"
        return None
    if isinstance(expected, dict) or (hasattr(expected, "keys") and hasattr(expected, "__getitem__")):
        keys = list(expected.keys())
        if not hasattr(got, "keys") or list(got.keys()) != keys:
            return f"its trace computes something else: {where} has other keys"
        return next((w for k in keys if (w := _compare(expected[k], got[k], f"{where}[{k!r}]"))), None)
    if dataclasses.is_dataclass(expected) and not isinstance(expected, type):
        return _compare(dataclasses.asdict(expected), dataclasses.asdict(got) if dataclasses.is_dataclass(got)
                        else got, where)
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected) or type(got) is not type(expected):
            return f"its trace computes something else: {where} is a {type(got).__name__} where the model gives a " \
                   f"{type(expected).__name__} of {len(expected)}"
        return next((w for i, (e, g) in enumerate(zip(expected, got)) if (w := _compare(e, g, f"{where}[{i}]"))), None)
    return None if expected == got else f"its trace computes something else: {where} is {got!r}, not {expected!r}"


def warn_route(model: nn.Module, opaque: Iterable[Opaque], stacklevel: int) -> None:
    """One PartialTraceWarning when the model took the module-swap path, naming why."""
    swapped = [o for o in opaque if o.kept == "swap"]
    if not swapped or swapped[0].reason == ASKED:
        return
    shown = "; ".join(o.describe() for o in swapped[:3])
    more = f"; and {len(swapped) - 3} more" if len(swapped) > 3 else ""
    warnings.warn(f"kdna_fx shares the convs of {type(model).__name__} by module swap, not by graph rewrite: "
                  f"{shown}{more}. The model keeps its own forward and classes; kdna_fx.report(model) shows the "
                  f"plan (docs/partial-tracing.md).", PartialTraceWarning, stacklevel=stacklevel + 1)
