"""Pass 5 (inference): fold each child's static modulation P(1+F)(1+S) into one stored kernel."""
from __future__ import annotations

import copy

import torch
from torch import nn

from kdna_fx import functional as KF
from kdna_fx.adapters import ADAPTER_TENSORS
from kdna_fx.carried import unwrapped
from kdna_fx.datamodel import children, module_form, record_of

from .lowering import lower


def fold(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every child conv reads a precomputed, frozen ``folded_weight``.

    The gate stays (it depends on the input), with its BatchNorm folded into its first linear layer
    (running statistics; a LayerNorm stays). The folded kernels are Parameters with
    requires_grad=False, so parameter counts show what inference stores. ``model`` itself is unchanged.
    A graph form (passes.lower) is folded in its module form and lowered again.
    """
    record_of(model)  # refuse models that were not transformed, with the usual message
    source = module_form(model)
    folded = copy.deepcopy(source)
    children_ = list(children(folded))
    lenders = {id(parent) for _, _, parent in children_}
    with torch.no_grad():
        kernels = [KF.modulate(m.parent_kernel, *(getattr(m, n) for n in ADAPTER_TENSORS)).detach().clone()
                   for _, m, _ in children_]  # all from the unfolded kernels, before any child changes
    for (_, adapter, _), weight in zip(children_, kernels):
        adapter.folded_weight = nn.Parameter(weight, requires_grad=False)
        for name in ADAPTER_TENSORS:
            setattr(adapter, name, None)
        if adapter.held_weight is not None and id(adapter) not in lenders:
            del adapter.weight  # a self-adapted child's own kernel: nobody reads it any more
        if adapter.gate is not None:
            adapter.gate.fold_norm()
    record_of(folded).folded = True
    if source is unwrapped(model):
        return folded
    return lower(folded)
