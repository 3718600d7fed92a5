"""Pass 4: rewrite each child conv into a parent-weight reference and one functional child conv.

For a child C of parent P the graph becomes (module form)::

    p = get_attr P.weight                      # once per parent, under its original name
    a = call_module C.gate(x)                  # [B, C_in]
    y = call_function child_conv(x, p, filter_scale=get_attr C.filter_scale,
                                   spatial_scale=get_attr C.spatial_scale, gate_values=a,
                                   bias=get_attr C.bias, stride=..., padding=..., groups=...)

kdna_fx.functional.child_conv is the one place where a child is computed: it gates only the child's
input edge, modulates the kernel and runs one batch-shared convolution. The child's conv module is
replaced by a ChildAdapter holding F, S, the gate and its bias; its own kernel is gone. Parents, norms and
everything else are untouched. What differs between an nn.Conv2d and an F.conv2d call is each conv-site
handler's (passes/sites.py). The pass leaves a TransformRecord (kdna_fx.datamodel) on the module, so fold,
as_function, report and save work on its result directly.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from torch import fx

from kdna_fx import functional as KF
from kdna_fx.adapters import ADAPTER_TENSORS
from kdna_fx.errors import KDNAError, SkippedSiteWarning
from kdna_fx.datamodel import ConvSite, Family, Plan, Skipped, TransformRecord, attach, refuse_converted, tag

from .find import first_in_channels
from .initialization import initialize
from .sites import handler_of
from .swapping import install, new_child


def check_plan(gm: fx.GraphModule | None, plan: Plan) -> Plan:
    """The part of ``plan`` that ``rewrite`` can apply to ``gm`` exactly (``gm`` None: that passes.swapping can).

    A family whose members do not share the parent's kernel shape is a user error (KDNAError). A conv
    whose call this pass does not recognise is left as it is, with a SkippedSiteWarning, rather than
    risk a wrong graph; a family left without children is dropped.
    """
    if plan.config is None:
        raise KDNAError("the plan does not belong to a model yet; pass it through passes.adopt (or build it with "
                        "passes.plan_families) before checking it")
    nodes = {n.name: n for n in gm.graph.nodes} if gm is not None else None
    families, skipped = [], list(plan.skipped)
    for family in plan.families:
        parent = plan.sites[family.parent]
        for child in family.children:
            site = plan.sites[child]
            mine, theirs = _geometry(site), _geometry(parent)
            if mine != theirs:
                diff = ", ".join(f"{k} {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k])
                raise KDNAError(f"{child!r} cannot be a child of {family.parent!r}: their kernels differ "
                                f"({diff}, child vs parent)")
        keep = []
        for name in dict.fromkeys((family.parent, *family.children)):
            reason = _unsupported(nodes.get(plan.sites[name].node), plan.sites[name]) if nodes is not None else None
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
    return dataclasses.replace(plan, families=tuple(families), skipped=tuple(skipped))


def _geometry(site: ConvSite) -> dict[str, Any]:
    return {"out_channels": site.out_channels, "in_channels": site.in_channels, "kernel": site.kernel_size,
            "groups": site.groups}


def _unsupported(node: fx.Node | None, site: ConvSite) -> str | None:
    if node is None:
        return f"graph node {site.node!r} is gone (was the plan built for another model?)"
    return handler_of(site).unsupported(node)


def rewrite(gm: fx.GraphModule, plan: Plan, init: str = "copy") -> fx.GraphModule:
    """Apply ``plan`` (as returned by ``check_plan``) to ``gm`` in place; returns the lint-clean, recompiled gm
    carrying its TransformRecord. A plan without families changes nothing but the record.

    ``init="copy"``: every child starts as an exact copy of its parent kernel (the paper's from-scratch
    init). ``init="trained"``: the adapters start from the model's own kernels (passes.initialization): gates
    at the exact identity, low-rank residuals from a truncated SVD. With ``plan.config.parent ==
    "centroid"`` the first member's kernel becomes the mean of the family's kernels and it becomes a child
    too."""
    if init not in ("copy", "trained"):
        raise KDNAError(f"init must be 'copy' or 'trained', got {init!r}")
    refuse_converted(gm)
    if plan.config is None:
        raise KDNAError("the plan does not belong to a model yet; pass it through passes.adopt (or build it with "
                        "passes.plan_families) before rewriting")
    params_before = sum(p.numel() for p in gm.parameters())
    in_channels = first_in_channels(gm)
    kernels = {m: gm.get_parameter(plan.sites[m].weight).detach().clone()
               for f in plan.families for m in f.members}
    centroid = plan.config.parent == "centroid"
    nodes = {n.name: n for n in gm.graph.nodes}
    # Positions of the original nodes; inserting new nodes never changes their relative order.
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for family in plan.families:
        parent = plan.sites[family.parent]
        if family.self_adapted:
            _rewrite_child(gm, nodes, order, parent, parent=parent, keeps_kernel=True)
            continue
        if centroid:  # the first member holds the family's new kernel and is a child too
            parent_weight = _rewrite_child(gm, nodes, order, parent, parent=parent, keeps_kernel=True,
                                           family=family, plan=plan)
        else:
            parent_weight = _parent_weight(gm, nodes, order, plan, family)
        for child in family.children:
            _rewrite_child(gm, nodes, order, plan.sites[child], parent=parent, parent_weight=parent_weight)
    gm.graph.lint()
    gm.recompile()
    attach(gm, TransformRecord(plan=plan, params_before=params_before, in_channels=in_channels, init=init))
    return initialize(gm, kernels)


def _first_member(nodes: dict[str, fx.Node], order: dict[fx.Node, int], plan: Plan, family: Family) -> fx.Node:
    # The parent reference must precede every user, and a hand-edited plan may put a child before its parent.
    return min((nodes[plan.sites[m].node] for m in family.members), key=order.__getitem__)


def _parent_weight(gm: fx.GraphModule, nodes: dict[str, fx.Node], order: dict[fx.Node, int], plan: Plan,
                   family: Family) -> fx.Node:
    parent = plan.sites[family.parent]
    handler = handler_of(parent)
    inputs = handler.graph_inputs(gm, nodes[parent.node])
    return handler.parent_weight(gm, inputs, parent, _first_member(nodes, order, plan, family), order)


def _rewrite_child(gm: fx.GraphModule, nodes: dict[str, fx.Node], order: dict[fx.Node, int], site: ConvSite, *,
                   parent: ConvSite, parent_weight: fx.Node | None = None, keeps_kernel: bool = False,
                   family: Family | None = None, plan: Plan | None = None) -> fx.Node:
    """Rewrite one conv into a child of ``parent`` reading ``parent_weight``. ``keeps_kernel``: the conv
    keeps a kernel (adapter-only mode, or a centroid family's first member, whose kernel the others read
    then: give ``family`` and ``plan``, and the returned node is that kernel's reference for them)."""
    graph, node = gm.graph, nodes[site.node]
    handler = handler_of(site)
    inputs = handler.graph_inputs(gm, node)
    holds = keeps_kernel and handler.keeps_kernel
    adapter = new_child(site, parent=parent.name, bias=inputs.bias, weight=gm.get_parameter(site.weight),
                        keeps_weight=holds, training=inputs.training)
    path = site.adapter_path
    install(gm, path, adapter)
    if parent_weight is None:  # the conv reads its own kernel (held by its adapter, or where it was)
        before = _first_member(nodes, order, plan, family) if family is not None and plan is not None else node
        parent_weight = handler.parent_weight(gm, inputs, site, before, order)

    with graph.inserting_before(node):
        a = tag(graph.call_module(f"{path}.gate", (inputs.x,)), "gate", site.name) if adapter.gate is not None else None
        scales = {n: tag(graph.get_attr(f"{path}.{n}"), n, site.name) if getattr(adapter, n) is not None else None
                  for n in ADAPTER_TENSORS}
        b: Any = inputs.bias_arg
        if adapter.bias is not None:
            b = tag(graph.get_attr(f"{path}.bias"), "bias", site.name)
        y = graph.call_function(KF.child_conv, (inputs.x, parent_weight), dict(
            **scales, gate_values=a, bias=b, stride=site.stride, padding=site.padding, dilation=site.dilation,
            groups=site.groups, padding_mode=site.padding_mode))
        tag(y, "child_conv", site.name, path)
    node.replace_all_uses_with(y)
    graph.erase_node(node)
    handler.finish(gm, site, inputs, keeps_kernel)
    return parent_weight
