"""The public phases: plan (inspect, edit) -> transform (rewrite) -> fold (deploy)."""
from __future__ import annotations

import copy
import warnings
from collections import Counter

from torch import fx, nn

from . import passes
from .config import KDNAConfig
from .errors import KDNATypeError, NoEligibleConvWarning
from .record import record_of


def _prepare(model: object, config: KDNAConfig | None, inplace: bool) -> tuple[nn.Module, fx.GraphModule, KDNAConfig]:
    config = config if config is not None else KDNAConfig()
    if not isinstance(config, KDNAConfig):
        raise KDNATypeError(f"config must be a kdna_fx.KDNAConfig, got {type(config).__name__}")
    module = passes.unwrap(model)
    if not inplace:
        # Tracing shares leaf modules and tensors with the original; a copy keeps the caller's model intact.
        module = copy.deepcopy(module)
    return module, passes.trace(module, config), config


def plan(model: nn.Module, config: KDNAConfig | None = None) -> passes.Plan:
    """The families transform() would build, and every skipped conv with its reason. Changes nothing.

    Edit the result with ``Plan.without`` / ``Plan.with_family`` (or ``to_dict`` -> ``Plan.from_dict``) and
    pass it back as ``transform(model, config, plan=...)``.
    """
    _, gm, config = _prepare(model, config, inplace=True)
    return passes.check_plan(gm, passes.plan_families(*passes.find_convs(gm, config), config))


def transform(model: nn.Module, config: KDNAConfig | None = None, *, plan: passes.Plan | None = None,
              inplace: bool = False) -> fx.GraphModule:
    """Trace ``model`` and turn same-shaped 3x3 convs of each stage into KernelDNA families.

    Returns a GraphModule. ``model`` is deep-copied first, so it stays untouched; ``inplace=True`` skips
    the copy (for very large models) and the result then shares its remaining parameters and leaf modules
    with ``model``. ``plan`` replaces the automatic planning with a given plan (edited, hand-written or
    saved); ``config`` then defaults to the plan's own.
    """
    if plan is not None and not isinstance(plan, passes.Plan):
        raise KDNATypeError(f"plan must be a kdna_fx.passes.Plan (kdna_fx.plan(...) or Plan.from_dict(...)), "
                            f"got {type(plan).__name__}")
    if config is None and plan is not None:
        config = plan.config
    module, gm, config = _prepare(model, config, inplace)
    sites, skipped = passes.find_convs(gm, config)
    chosen = (passes.plan_families(sites, skipped, config) if plan is None
              else passes.adopt(plan, sites, skipped, config))
    chosen = passes.check_plan(gm, chosen)
    if not chosen.families:
        reasons = Counter(s.reason.split(":")[0] for s in chosen.skipped)
        summary = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3)) or "the model has no 2-D convolution"
        warnings.warn(
            f"kdna_fx found no convolutions to share in {type(module).__name__} ({summary}); the model is "
            f"returned unchanged (traced). kdna_fx.report(model) lists each conv with its reason; "
            f"KDNAConfig(kernel_sizes=(1, 3), depthwise=True, stage_depth=0) widens the search.",
            NoEligibleConvWarning, stacklevel=2)
    return passes.rewrite(gm, chosen)


def plan_of(kmodel: nn.Module) -> passes.Plan:
    """The plan transform() applied to ``kmodel`` (families and skipped convs, with its config)."""
    return record_of(kmodel).plan


fold = passes.fold
as_function = passes.as_function
