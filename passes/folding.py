"""Pass 5 (inference): fold each child's static modulation P(1+F)(1+S) into one stored kernel."""
from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
from torch import fx, nn

from kdna_fx import functional as KF
from kdna_fx.adapters import ADAPTER_TENSORS, ChildAdapter
from kdna_fx.errors import KDNAError, SkippedSiteWarning
from kdna_fx.datamodel import TAG_KEY, child_nodes, graph_of, record_of, store_tags, tag_of


def fold(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every child conv reads a precomputed, frozen ``folded_weight``.

    The gate stays (it depends on the input), with its BatchNorm folded into its first linear layer
    (running statistics; a LayerNorm stays). The folded kernels are Parameters with
    requires_grad=False, so parameter counts show what inference stores. ``model`` itself is unchanged.
    A module-swapped model has each of its children folded in place of its ChildAdapter.
    """
    record_of(model)  # refuse models that were not transformed, with the usual message
    model = copy.deepcopy(model)
    gm = graph_of(model)
    if gm is not None:
        _fold_graph(gm)
    else:
        _fold_swapped(model)
    record_of(model).folded = True
    return model


def _fold_swapped(model: nn.Module) -> None:
    """Fold every module-swapped child in place: its ``folded_weight`` replaces kernel, F, S, B and A."""
    children = [m for m in model.modules() if isinstance(m, ChildAdapter)]
    lenders = {id(m.__dict__["_parent_module"]) for m in children}
    with torch.no_grad():
        folded = [KF.modulate(m.parent_kernel, *(getattr(m, n) for n in ADAPTER_TENSORS)).detach().clone()
                  for m in children]  # all from the unfolded kernels, before any child changes
    for adapter, weight in zip(children, folded):
        adapter.folded_weight = nn.Parameter(weight, requires_grad=False)
        for name in ADAPTER_TENSORS:
            setattr(adapter, name, None)
        if adapter.held_weight is not None and id(adapter) not in lenders:
            del adapter.weight  # a self-adapted child's own kernel: nobody reads it any more
        if adapter.gate is not None:
            adapter.gate.fold_norm()


def _fold_graph(gm: fx.GraphModule) -> None:
    """Fold ``gm``'s child convs in place (see fold)."""
    graph = gm.graph
    tagged = child_nodes(gm)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is KF.child_conv and node not in tagged:
            warnings.warn(f"fold left {node.name!r} unfolded: it was not inserted by kdna_fx.transform",
                          SkippedSiteWarning, stacklevel=3)
    for node in tagged:
        path = tag_of(node).adapter
        adapter = gm.get_submodule(path)
        weight_node = node.args[1]
        scale_nodes = [node.kwargs.get(n) for n in ADAPTER_TENSORS]
        tensors = [_value(gm, n) for n in (weight_node, *scale_nodes)]
        with torch.no_grad():
            folded = KF.modulate(*tensors).detach().clone()
        adapter.folded_weight = nn.Parameter(folded, requires_grad=False)
        if adapter.gate is not None:
            adapter.gate.fold_norm()
        with graph.inserting_before(node):
            new = graph.get_attr(f"{path}.folded_weight")
            new.meta[TAG_KEY] = dataclasses.replace(tag_of(node), role="folded_weight")
        node.args = (node.args[0], new)
        node.kwargs = {**node.kwargs, **dict.fromkeys(ADAPTER_TENSORS)}
        for old in (weight_node, *scale_nodes):
            if isinstance(old, fx.Node) and old.op == "get_attr" and not old.users:
                graph.erase_node(old)
                owner, _, name = old.target.rpartition(".")
                if isinstance(gm.get_submodule(owner), ChildAdapter):  # F, S, B, A or a kernel a child held
                    if name == "weight":
                        delattr(gm.get_submodule(owner), name)
                    else:
                        setattr(gm.get_submodule(owner), name, None)
    graph.lint()
    gm.recompile()
    store_tags(gm)


def _value(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    if node is None:
        return None
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        raise KDNAError(f"fold expects stored tensors as the kernel and scales of a child, got {node!r}")
    return gm.get_parameter(node.target)
