"""Pass 6 (when asked): lower a transformed model to the design card's FX graph, checked against the model.

The transformed model is the user's own (children are ChildAdapter modules in its tree, passes.swapping). Its
graph form is what tracing it gives: each child's ``ChildAdapter.forward`` becomes one call of the fx-wrapped
``kdna_fx.functional.child_conv`` whose kernel argument is a ``get_attr`` of the parent's weight, its F, S
and bias ``get_attr`` nodes and its gate a ``call_module``. The GraphModule holds the very ChildAdapter and
parameter objects of the model (one state dict, the same keys), and keeps the model as its ``module_form``
(kdna_fx.datamodel), through which fold, calibrate, CKA and report read its children.

A trace is only as right as the Python it follows, so a lowering is always checked: on ``example_inputs``,
else on inputs inferred by a documented rule (``inferred_inputs``); a trace that differs from the model, that
fails, or that differs between train and eval mode (Python reading ``self.training``) is a KDNAError.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import fx, nn

from kdna_fx.adapters import Gate
from kdna_fx.carried import keep
from kdna_fx.datamodel import SOURCE_ATTR, attach, children, module_form, record_of
from kdna_fx.errors import KDNAError
from kdna_fx.utils import KeptModes

from .routing import Example, compare, run
from .swapping import install
from .tracing import trace

SIZES = (64, 224)
"""Inferred inputs: a batch of 2 images with the first conv's input channels, at the first of these sizes
the model accepts (a model that takes neither needs example_inputs)."""


def inferred_inputs(model: nn.Module) -> Example:
    """Inputs to check a lowering with when none are given (see SIZES); a KDNAError when none fits."""
    channels = record_of(model).in_channels or 3
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    errors = []
    for size in SIZES:
        example = Example((torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
                           .to(device, dtype),))
        try:
            run(model, example)
            return example
        except Exception as exc:  # noqa: BLE001 - any failure: try the next size, then say what failed
            errors.append(f"{size}x{size}: {type(exc).__name__}: {str(exc)[:120]}")
    raise KDNAError(f"kdna_fx cannot check a graph of {type(model).__name__} without example inputs: it runs on "
                    f"none of the inputs it tries (batch 2, {channels} channels; {'; '.join(errors)}). Pass "
                    f"example_inputs=(x,) as the model's forward takes them.")


def lower(kmodel: nn.Module, example_inputs: Any = None, example_kwargs: dict[str, Any] | None = None,
          *, config: Any = None) -> fx.GraphModule:
    """The graph form of the transformed ``kmodel`` (see the module docstring), checked on ``example_inputs``
    (else inferred inputs). ``kmodel`` is not changed; the graph shares its tensors and modules."""
    source = module_form(kmodel)
    record = record_of(source)
    config = config if config is not None else record.plan.config
    example = Example.of(example_inputs, example_kwargs) or inferred_inputs(source)
    with KeptModes(source):
        gm = trace(source, dataclasses.replace(config, leaf_modules=(*config.leaf_modules, Gate)))
        source.train(not source.training)
        other = trace(source, dataclasses.replace(config, leaf_modules=(*config.leaf_modules, Gate)))
    if other.code != gm.code:
        raise KDNAError(f"kdna_fx cannot lower {type(source).__name__} to a graph: its forward reads the training "
                        f"mode (self.training), so a graph would keep the mode it was traced in. Use the model "
                        f"itself (KDNAConfig(rewrite='auto'), the default), which keeps its own forward.")
    for path, child, _ in children(source):
        install(gm, path, child)  # the model's own ChildAdapters, where the graph reads their tensors
    try:
        got = run(gm, example)
    except Exception as exc:  # noqa: BLE001 - a trace that fails where the model runs cannot stand for it
        got = exc
    expected = run(source, example)
    why = (f"its trace fails on the inputs ({type(got).__name__}: {str(got)[:200]})"
           if isinstance(got, Exception) else compare(expected, got, "output"))
    if why is not None:
        raise KDNAError(f"kdna_fx cannot lower {type(source).__name__} to a graph: {why}; torch.fx followed other "
                        f"Python than the model runs. Use the model itself (KDNAConfig(rewrite='auto'), the "
                        f"default), which keeps its own forward, or make that forward traceable.")
    attach(gm, dataclasses.replace(copy.copy(record), checked="example inputs" if example_inputs is not None
                                   or example_kwargs else f"inferred inputs {tuple(example.args[0].shape)}"))
    keep(gm, SOURCE_ATTR, (source,))
    return gm
