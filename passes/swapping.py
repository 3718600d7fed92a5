"""Pass 4: put each child in place by swapping its conv module for a ChildAdapter bound to its parent.

A KernelDNA child needs only its parent's kernel, its own adapters and its own input, all local to the conv
module. So each child conv module (1-D, 2-D or 3-D) is replaced, at the same path, by a ChildAdapter bound to
its parent module; ``child(x)`` computes ``kdna_fx.functional.child_conv``. Everything else (the user's module objects, their
classes, attributes, methods, hooks, containers and Python forwards) stays as it was: the transformed model is
the user's model. This is the only way children are put in place; the graph form is a lowering of the result
(passes.lowering), made when asked.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from kdna_fx.adapters import ChildAdapter, Gate
from kdna_fx.datamodel import ConvSite, Plan, TransformRecord, attach, refuse_converted
from kdna_fx.errors import KDNAError

from .find import first_in_channels
from .initialization import initialize


def check_plan(plan: Plan) -> Plan:
    """``plan`` after checking that every child shares its parent's kernel shape (else a KDNAError)."""
    if plan.config is None:
        raise KDNAError("the plan does not belong to a model yet; pass it through passes.adopt (or build it with "
                        "passes.plan_families) before checking it")
    for family in plan.families:
        parent = plan.sites[family.parent]
        for child in family.children:
            mine, theirs = _geometry(plan.sites[child]), _geometry(parent)
            if mine != theirs:
                diff = ", ".join(f"{k} {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k])
                raise KDNAError(f"{child!r} cannot be a child of {family.parent!r}: their kernels differ "
                                f"({diff}, child vs parent)")
    return plan


def _geometry(site: ConvSite) -> dict[str, Any]:
    return {"out_channels": site.out_channels, "in_channels": site.in_channels, "kernel": site.kernel_size,
            "groups": site.groups}


def new_child(site: ConvSite, *, parent: str, bias: nn.Parameter | None, weight: nn.Parameter,
              keeps_weight: bool, training: bool) -> ChildAdapter:
    """The ChildAdapter of ``site`` (both passes build children here): its gate, F, S, low-rank residual and
    bias; ``keeps_weight``: it holds the shared kernel itself (adapter-only mode, a centroid's first member)."""
    cfg = site.adapter
    assert cfg is not None, "plan_families only keeps sites that have an adapter config"
    # transform resolves gate_norm="auto" per model; passes composed by hand get the reference's BatchNorm.
    norm = "batch" if cfg.gate_norm == "auto" else cfg.gate_norm
    gate = Gate(site.in_channels, cfg.reduction, norm, cfg.gate_min_hidden, cfg.gate_scale) if cfg.gate else None
    adapter = ChildAdapter(
        parent=parent, out_channels=site.out_channels, in_channels=site.in_channels,
        kernel_size=site.kernel_size, stride=site.stride, padding=site.padding, dilation=site.dilation,
        groups=site.groups, padding_mode=site.padding_mode, bias=bias, filter_scale=cfg.filter_scale,
        spatial_scale=cfg.spatial_scale, rank=cfg.rank, gate=gate, weight=weight if keeps_weight else None,
    ).to(device=weight.device, dtype=weight.dtype)
    # A new module is in training mode; the child of a model in eval mode must not normalise its gate with
    # batch statistics (nor update them) until someone calls .train().
    adapter.train(training)
    if site.frozen:  # a frozen part of the model stays frozen: its adapters do not train either
        adapter.freeze_adapters()
    return adapter


def install(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` of ``model`` (setattr on its owner: a container keeps its type and order), and
    at every other path where the module it replaces is registered too (an alias, as in MONAI's DynUNet)."""
    try:
        old = model.get_submodule(path)
    except AttributeError:  # a new path (the adapter of an F.conv2d site, beside its weight)
        old = None
    paths = [p for p, m in model.named_modules(remove_duplicate=False) if old is not None and m is old]
    for alias in dict.fromkeys([path, *paths]):
        owner_path, _, field = alias.rpartition(".")
        setattr(model.get_submodule(owner_path), field, module)


def swap(model: nn.Module, plan: Plan, init: str = "copy", order: str = "registration") -> nn.Module:
    """Apply ``plan`` (module sites, names from ``model``'s root) to ``model`` in place and return it carrying
    its TransformRecord (``order``: what ordered its convs, passes.routing).

    ``init="copy"``: every child starts as an exact copy of its parent kernel (the paper's from-scratch
    init). ``init="trained"``: the adapters start from the model's own kernels (passes.initialization): gates
    at the exact identity, low-rank residuals from a truncated SVD. With ``plan.config.parent ==
    "centroid"`` the first member's kernel becomes the mean of the family's kernels and it becomes a child
    too."""
    if init not in ("copy", "trained"):
        raise KDNAError(f"init must be 'copy' or 'trained', got {init!r}")
    refuse_converted(model)
    params_before = sum(p.numel() for p in model.parameters())
    in_channels = first_in_channels(model)
    kernels = {m: model.get_parameter(plan.sites[m].weight).detach().clone() for f in plan.families for m in f.members}
    centroid = plan.config.parent == "centroid"
    for family in plan.families:
        site = plan.sites[family.parent]
        conv = model.get_submodule(site.name)
        if family.self_adapted or centroid:  # the first member holds the kernel and is a child too
            holder = new_child(site, parent=site.name, bias=conv.bias, weight=conv.weight, keeps_weight=True,
                               training=conv.training)
            install(model, site.name, holder)
            conv = holder
        for child in family.children:
            if child == family.parent:
                continue
            child_site = plan.sites[child]
            old = model.get_submodule(child)
            adapter = new_child(child_site, parent=site.name, bias=old.bias, weight=old.weight, keeps_weight=False,
                                training=old.training)
            install(model, child, adapter.bind(conv))
    attach(model, TransformRecord(plan=plan, params_before=params_before, in_channels=in_channels, init=init,
                                  order=order))
    return initialize(model, kernels)
