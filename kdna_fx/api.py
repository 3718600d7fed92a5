"""The public phases: plan (inspect) -> transform (rewrite) -> fold (deploy)."""
from __future__ import annotations

import copy
import warnings
from collections import Counter

import torch.nn.functional as F
from torch import fx, nn

from . import passes
from ._record import TransformRecord, record_of
from .config import KDNAConfig
from .errors import KDNAError, NoEligibleConvWarning


def _prepare(model: object, config: KDNAConfig | None, inplace: bool) -> tuple[nn.Module, fx.GraphModule, KDNAConfig]:
    config = config if config is not None else KDNAConfig()
    if not isinstance(config, KDNAConfig):
        raise TypeError(f"config must be a kdna_fx.KDNAConfig, got {type(config).__name__}")
    module = passes.unwrap(model)
    if not inplace:
        # Tracing shares leaf modules and tensors with the original; a copy keeps the caller's model intact.
        module = copy.deepcopy(module)
    return module, passes.trace(module, config), config


def plan(model: nn.Module, config: KDNAConfig | None = None) -> passes.Plan:
    """The families transform() would build, and every skipped conv with its reason. Changes nothing."""
    _, gm, config = _prepare(model, config, inplace=True)
    return passes.check_plan(gm, passes.plan_families(*passes.find_convs(gm, config), config))


def transform(model: nn.Module, config: KDNAConfig | None = None, *, plan: passes.Plan | None = None,
              inplace: bool = False) -> fx.GraphModule:
    """Trace ``model`` and turn same-shaped 3x3 convs of each stage into KernelDNA families.

    Returns a GraphModule. ``model`` is deep-copied first, so it stays untouched; ``inplace=True`` skips
    the copy (for very large models) and the result then shares its remaining parameters and leaf modules
    with ``model``. ``plan`` replaces the automatic planning with an edited kdna_fx.plan(...) result.
    """
    module, gm, config = _prepare(model, config, inplace)
    params_before = sum(p.numel() for p in module.parameters())
    sites, skipped = passes.find_convs(gm, config)
    chosen = passes.plan_families(sites, skipped, config) if plan is None else _adopt(plan, sites)
    chosen = passes.check_plan(gm, chosen)
    if chosen.families:
        passes.rewrite(gm, chosen)
    else:
        reasons = Counter(s.reason.split(":")[0] for s in chosen.skipped)
        summary = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3)) or "the model has no 2-D convolution"
        warnings.warn(
            f"kdna_fx found no convolutions to share in {type(module).__name__} ({summary}); the model is "
            f"returned unchanged (traced). kdna_fx.report(model) lists each conv with its reason; "
            f"KDNAConfig(kernel_sizes=(1, 3), depthwise=True, stage_depth=0) widens the search.",
            NoEligibleConvWarning, stacklevel=2)
    gm.meta["kdna"] = TransformRecord(config=config.to_dict(), plan=chosen, params_before=params_before,
                                      in_channels=_first_in_channels(gm))
    return gm


def plan_of(kmodel: nn.Module) -> passes.Plan:
    """The plan transform() applied to ``kmodel`` (families and skipped convs)."""
    return record_of(kmodel).plan


def _adopt(plan: passes.Plan, sites: list[passes.ConvSite]) -> passes.Plan:
    by_name = {s.name: s for s in sites}
    named = [n for f in plan.families for n in (f.parent, *f.children)]
    missing = sorted(set(named) - set(by_name))
    if missing:
        raise KDNAError(f"the given plan names convs this model does not offer for sharing: {missing[:5]}; "
                        f"build the plan with kdna_fx.plan(model, config) on the same architecture and config")
    repeated = [n for n, c in Counter(n for f in plan.families for n in f.children).items() if c > 1]
    if repeated:
        raise KDNAError(f"a conv can be the child of one parent only: {repeated[:5]}")
    return passes.Plan(plan.families, plan.skipped, by_name)


def _first_in_channels(gm: fx.GraphModule) -> int | None:
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.modules.conv._ConvNd):
            return gm.get_submodule(node.target).in_channels
        if node.op == "call_function" and node.target is F.conv2d:
            args = passes.find.conv2d_arguments(node)
            if isinstance(args["weight"], fx.Node) and args["weight"].op == "get_attr":
                return gm.get_parameter(args["weight"].target).shape[1] * int(args["groups"])
    return None


fold = passes.fold
as_function = passes.as_function
