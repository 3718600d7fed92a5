"""Pass 4: rewrite each child conv into parent-weight reference + functional adapter ops.

For a child C of parent P the graph becomes (module form)::

    p  = get_attr P.weight                       # once per parent, its original name
    a  = call_module C.gate(x)                   # [B, C_in]
    xg = call_function scale_channels(x, a)      # only the child's input edge is gated
    w  = call_function modulate(p, get_attr C.filter_scale, get_attr C.spatial_scale)
    y  = call_function conv2d(xg, w, get_attr C.bias, stride, padding, dilation, groups, padding_mode)

The child's conv module is replaced by a ChildAdapter holding F, S, the gate and its bias; its own
kernel is gone. Parents, norms and everything else are untouched.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from torch import fx, nn

from kdna_fx import functional as KF
from kdna_fx.adapters import ChildAdapter, Gate
from kdna_fx.errors import KDNAError, SkippedSiteWarning

from .find import ConvSite, Skipped, conv2d_arguments
from .plan import Family, Plan


def check_plan(gm: fx.GraphModule, plan: Plan) -> Plan:
    """The part of ``plan`` that ``rewrite`` can apply to ``gm`` exactly.

    A family whose members do not share the parent's kernel shape is a user error (KDNAError). A conv
    whose call this pass does not recognise is left as it is, with a SkippedSiteWarning, rather than
    risk a wrong graph; a family left without children is dropped.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    families, skipped = [], list(plan.skipped)
    for family in plan.families:
        parent = plan.sites[family.parent]
        for child in family.children:
            site = plan.sites[child]
            if (site.out_channels, site.in_channels, site.kernel_size, site.groups) != (
                    parent.out_channels, parent.in_channels, parent.kernel_size, parent.groups):
                raise KDNAError(f"{child!r} cannot be a child of {family.parent!r}: kernel shapes differ "
                                f"({site.out_channels}x{site.in_channels // site.groups}x{site.kernel_size}, "
                                f"groups={site.groups} vs the parent's {family.shape}, groups={family.groups})")
        keep = []
        for name in dict.fromkeys((family.parent, *family.children)):
            reason = _unsupported(nodes.get(plan.sites[name].node), plan.sites[name])
            if reason is None:
                keep.append(name)
                continue
            warnings.warn(f"kdna_fx left {name!r} as it was: {reason}", SkippedSiteWarning, stacklevel=3)
            skipped.append(Skipped(name, reason))
        if family.parent not in keep:
            skipped.extend(Skipped(c, f"its parent {family.parent!r} was left as it was") for c in keep)
            continue
        children = tuple(c for c in family.children if c in keep)
        if children:
            families.append(dataclasses.replace(family, children=children))
    return Plan(tuple(families), tuple(skipped), plan.sites)


def _unsupported(node: fx.Node | None, site: ConvSite) -> str | None:
    if node is None:
        return f"graph node {site.node!r} is gone (was the plan built for another model?)"
    if site.kind == "module" and len(node.args) + len(node.kwargs) != 1:
        return "the conv module is called with more than one argument"
    if site.kind == "function" and not isinstance(conv2d_arguments(node)["input"], fx.Node):
        return "the F.conv2d input is a constant, not a graph value"
    return None


def rewrite(gm: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """Apply ``plan`` (as returned by ``check_plan``) to ``gm`` in place; returns the lint-clean, recompiled gm."""
    nodes = {n.name: n for n in gm.graph.nodes}
    # Positions of the original nodes; inserting new nodes never changes their relative order.
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for family in plan.families:
        parent = plan.sites[family.parent]
        if family.self_adapted:
            _rewrite_child(gm, nodes, parent, parent_weight=None, parent_name=parent.name)
            continue
        parent_weight = _parent_weight_node(gm, nodes, order, plan, family)
        for child in family.children:
            _rewrite_child(gm, nodes, plan.sites[child], parent_weight=parent_weight, parent_name=parent.name)
    gm.graph.lint()
    gm.recompile()
    return gm


def _tag(node: fx.Node, role: str, child: str, adapter: str | None = None) -> fx.Node:
    # Later passes (fold, report) find what this pass inserted through this tag, not by pattern matching.
    node.meta["kdna"] = {"role": role, "child": child, "adapter": adapter}
    if node.op == "call_function":
        node.meta["is_wrapped"] = True  # generated code re-registers it with torch.fx.wrap: re-tracing keeps it a leaf
    return node


def _parent_weight_node(gm: fx.GraphModule, nodes: dict[str, fx.Node], order: dict[fx.Node, int], plan: Plan,
                        family: Family) -> fx.Node:
    parent = plan.sites[family.parent]
    # The reference must precede every user, and a hand-edited plan may put a child before its parent.
    first = min((nodes[plan.sites[m].node] for m in (family.parent, *family.children)), key=order.__getitem__)
    if parent.kind == "function":
        weight = conv2d_arguments(nodes[parent.node])["weight"]  # the parent's own get_attr, reused by all
        if order[weight] > order[first]:
            first.prepend(weight)
        return weight
    with gm.graph.inserting_before(first):
        return _tag(gm.graph.get_attr(parent.weight), "parent_weight", parent.name)


def _install(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    owner_path, _, field = path.rpartition(".")
    setattr(gm.get_submodule(owner_path), field, module)


def _rewrite_child(gm: fx.GraphModule, nodes: dict[str, fx.Node], site: ConvSite, *,
                   parent_weight: fx.Node | None, parent_name: str) -> None:
    graph, node, cfg = gm.graph, nodes[site.node], site.adapter
    assert cfg is not None, "plan_families only keeps sites that have an adapter config"
    self_adapted = parent_weight is None
    weight = gm.get_parameter(site.weight)
    if site.kind == "module":
        conv = gm.get_submodule(site.name)
        x = node.args[0] if node.args else node.kwargs["input"]
        bias, conv_args = conv.bias, {}
    else:
        conv_args = conv2d_arguments(node)
        x, bias = conv_args["input"], None
    gate = Gate(site.in_channels, cfg.reduction, cfg.gate_norm, cfg.gate_min_hidden) if cfg.gate else None
    adapter = ChildAdapter(
        parent=parent_name, out_channels=site.out_channels, in_channels=site.in_channels,
        kernel_size=site.kernel_size, stride=site.stride, padding=site.padding, dilation=site.dilation,
        groups=site.groups, padding_mode=site.padding_mode, bias=bias, filter_scale=cfg.filter_scale,
        spatial_scale=cfg.spatial_scale, gate=gate,
        weight=weight if (self_adapted and site.kind == "module") else None,
    ).to(device=weight.device, dtype=weight.dtype)
    path = site.adapter_path
    _install(gm, path, adapter)

    with graph.inserting_before(node):
        if self_adapted:
            parent_weight = (_tag(graph.get_attr(f"{path}.weight"), "parent_weight", site.name)
                             if site.kind == "module" else conv_args["weight"])
        gated = x
        if gate is not None:
            a = _tag(graph.call_module(f"{path}.gate", (x,)), "gate", site.name)
            gated = _tag(graph.call_function(KF.scale_channels, (x, a)), "scale_channels", site.name)
        w = parent_weight
        if adapter.filter_scale is not None or adapter.spatial_scale is not None:
            scales = [_tag(graph.get_attr(f"{path}.{n}"), n, site.name) if getattr(adapter, n) is not None else None
                      for n in ("filter_scale", "spatial_scale")]
            w = _tag(graph.call_function(KF.modulate, (parent_weight, *scales)), "modulate", site.name, path)
        b: Any = conv_args.get("bias")
        if site.kind == "module" and adapter.bias is not None:
            b = _tag(graph.get_attr(f"{path}.bias"), "bias", site.name)
        y = graph.call_function(KF.conv2d, (gated, w, b), dict(
            stride=site.stride, padding=site.padding, dilation=site.dilation, groups=site.groups,
            padding_mode=site.padding_mode))
        _tag(y, "conv", site.name)
    node.replace_all_uses_with(y)
    graph.erase_node(node)
    if site.kind == "function" and not self_adapted:
        old_weight = conv_args["weight"]
        graph.erase_node(old_weight)
        owner_path, _, field = site.weight.rpartition(".")
        delattr(gm.get_submodule(owner_path), field)
