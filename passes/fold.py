"""Pass 5 (inference): fold each child's static modulation P(1+F)(1+S) into one stored kernel."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import fx, nn

from kdna_fx import functional as KF
from kdna_fx._record import record_of
from kdna_fx.errors import SkippedSiteWarning


def fold(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` where every ``modulate`` node reads a precomputed, frozen ``folded_weight``.

    The gate stays (it depends on the input). The folded kernels are Parameters with
    requires_grad=False, so parameter counts show what inference stores. ``gm`` itself is unchanged.
    """
    record_of(gm)  # refuse models that were not transformed, with the usual message
    gm = copy.deepcopy(gm)
    graph = gm.graph
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target is KF.modulate):
            continue
        if "kdna" not in node.meta:
            warnings.warn(f"fold left {node.name!r} unfolded: it was not inserted by kdna_fx.transform",
                          SkippedSiteWarning, stacklevel=2)
            continue
        path, args = node.meta["kdna"]["adapter"], list(node.args)  # erase_node clears node.args
        inputs = [gm.get_parameter(a.target) if isinstance(a, fx.Node) else None for a in args]
        with torch.no_grad():
            folded = KF.modulate(*inputs).detach().clone()
        adapter = gm.get_submodule(path)
        adapter.folded_weight = nn.Parameter(folded, requires_grad=False)
        with graph.inserting_before(node):
            new = graph.get_attr(f"{path}.folded_weight")
            new.meta["kdna"] = dict(node.meta["kdna"], role="folded_weight")
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for arg in args:
            if isinstance(arg, fx.Node) and arg.op == "get_attr" and not arg.users:
                graph.erase_node(arg)
                if arg.meta.get("kdna", {}).get("role") in ("filter_scale", "spatial_scale"):
                    setattr(adapter, arg.target.rpartition(".")[2], None)
    graph.lint()
    gm.recompile()
    record_of(gm).folded = True
    return gm
