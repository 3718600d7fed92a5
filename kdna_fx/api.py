"""The public phases: plan (inspect, edit) -> transform (rewrite) -> fold (deploy)."""
from __future__ import annotations

import copy
import dataclasses
import warnings
from collections import Counter
from typing import Callable

import torch
from torch import Tensor, fx, nn

from . import passes
from .config import KDNAConfig
from .adapters import adapter_parameters
from .errors import ConfigError, KDNATypeError, NoEligibleConvWarning, StateError
from .record import record_of


def _module(model: object, config: KDNAConfig | None, inplace: bool) -> tuple[nn.Module, KDNAConfig]:
    config = config if config is not None else KDNAConfig()
    if not isinstance(config, KDNAConfig):
        raise KDNATypeError(f"config must be a kdna_fx.KDNAConfig, got {type(config).__name__}")
    module = passes.unwrap(model)
    if not inplace:
        # Tracing shares leaf modules and tensors with the original; a copy keeps the caller's model intact.
        module = copy.deepcopy(module)
    return module, config


def _prepare(model: object, config: KDNAConfig | None, inplace: bool) -> tuple[nn.Module, fx.GraphModule, KDNAConfig]:
    """The model traced as a whole (kdna_fx.peers swaps convs in one graph; it does no partial tracing)."""
    module, config = _module(model, config, inplace)
    return module, passes.trace(module, config), config


def _plans(module: nn.Module, traced: passes.Traced, config: KDNAConfig, data: object,
           given: passes.Plan | None) -> dict[str, passes.Plan]:
    """One checked plan per traced part: ``given`` split into the parts, or plan_families (with the convs'
    output similarities measured on ``data`` when the policy needs them)."""
    found = {path: passes.find_convs(gm, config) for path, gm in traced.parts.items()}
    if given is not None:
        if data is not None:
            raise ConfigError("transform got both plan= and data=; data only chooses the families of a new plan "
                              "(policy='cka'), a given plan already has them")
        wanted = passes.split_plan(given, traced.parts)
        plans = {path: passes.adopt(wanted[path], *found[path], config) for path in traced.parts}
    elif config.policy != "cka":
        if data is not None:
            raise ConfigError("data is only used by KDNAConfig(policy='cka'), which groups convs by measured "
                              "similarity; drop data or set policy='cka'")
        plans = {path: passes.plan_families(*found[path], config) for path in traced.parts}
    else:
        plans = _similar_plans(module, found, config, data)
    return {path: passes.check_plan(traced.parts[path], plans[path]) for path in traced.parts}


def _similar_plans(module: nn.Module, found: dict[str, tuple[list[passes.ConvSite], list[passes.Skipped]]],
                   config: KDNAConfig, data: object) -> dict[str, passes.Plan]:
    """policy='cka': the convs' outputs measured once, on the whole model, by their names from its root."""
    if data is None:
        raise ConfigError("KDNAConfig(policy='cka') groups convs by the similarity of their outputs and needs "
                          "calibration images: pass data=images (a tensor [N, C, H, W] or a DataLoader)")
    from .cka import layer_similarity

    def rooted(path: str, name: str) -> str:
        return f"{path}.{name}" if path else name

    names = [rooted(path, s.name) for path, (sites, _) in found.items() for s in sites]
    measured = layer_similarity(module, data, layers=names, progress=False) if len(names) > 1 else None
    index = {n: i for i, n in enumerate(measured.names)} if measured is not None else {}

    def similarity_in(path: str) -> Callable[[str, str], float]:
        def similarity(a: str, b: str) -> float:
            return float(measured.matrix[index[rooted(path, a)], index[rooted(path, b)]])  # type: ignore[union-attr]
        return similarity

    return {path: passes.plan_families(sites, skipped, config, similarity_in(path))
            for path, (sites, skipped) in found.items()}


def plan(model: nn.Module, config: KDNAConfig | None = None, *, data: object = None) -> passes.Plan:
    """The families transform() would build, and every skipped conv with its reason. Changes nothing.

    Edit the result with ``Plan.without`` / ``Plan.with_family`` (or ``to_dict`` -> ``Plan.from_dict``) and
    pass it back as ``transform(model, config, plan=...)``. ``data``: calibration images for
    ``KDNAConfig(policy="cka")`` (the convs' outputs are compared on them with linear CKA). On a model that
    is only partly traceable (docs/partial-tracing.md) the names run from the model's root.
    """
    module, config = _module(model, config, inplace=True)
    traced = passes.trace_parts(module, config)
    passes.warn_opaque(module, traced.opaque, stacklevel=2)
    return passes.merge_plans(_plans(module, traced, config, data, None), config)


def transform(model: nn.Module, config: KDNAConfig | None = None, *, plan: passes.Plan | None = None,
              init: str = "copy", data: object = None, inplace: bool = False) -> nn.Module:
    """Trace ``model`` and turn same-shaped 3x3 convs of each stage into KernelDNA families.

    Returns a GraphModule when the model traces as a whole. ``model`` is deep-copied first, so it stays
    untouched; ``inplace=True`` skips the copy (for very large models) and the result then shares its
    remaining parameters and leaf modules with ``model``. ``plan`` replaces the automatic planning with a
    given plan (edited, hand-written or saved plan); ``config`` then defaults to the plan's own.

    A model whose own forward torch.fx cannot trace comes back as itself (its class, its Python forward)
    with its traceable subtrees rewritten into GraphModules in place; parts that cannot be traced stay as
    they were, named by one PartialTraceWarning (``KDNAConfig(untraceable="error")`` raises KDNATraceError
    instead). See docs/partial-tracing.md.

    ``init="copy"`` (default, the paper's from-scratch init): each child starts as an exact copy of its
    parent. ``init="trained"`` (converting a trained model): every gate starts as the exact identity
    (``gate_scale`` 2 with fc2 = 0, so a(x) = 1 and the gate still trains), and each child's low-rank
    residual (``AdapterConfig(rank=r)``) starts as the truncated SVD of its own kernel minus its parent's.
    Follow with ``kdna_fx.calibrate`` on unlabeled images. ``data``: calibration images for
    ``KDNAConfig(policy="cka")``, as in ``plan``.
    """
    if init not in ("copy", "trained"):
        raise ConfigError(f"init must be 'copy' (train from scratch) or 'trained' (convert a trained model), "
                          f"got {init!r}")
    if plan is not None and not isinstance(plan, passes.Plan):
        raise KDNATypeError(f"plan must be a kdna_fx.passes.Plan (kdna_fx.plan(...) or Plan.from_dict(...)), "
                            f"got {type(plan).__name__}")
    if config is None and plan is not None:
        config = plan.config
    if init == "trained":
        config = (config if config is not None else KDNAConfig()).map_adapters(
            lambda a: dataclasses.replace(a, gate_scale=2.0))
    module, config = _module(model, config, inplace)
    traced = passes.trace_parts(module, config)
    plans = _plans(module, traced, config, data, plan)
    kmodel = passes.assemble(module, traced, plans, config, init=init)
    record = record_of(kmodel)
    passes.warn_opaque(module, record.opaque, stacklevel=2)
    if not record.plan.families:
        reasons = Counter(s.reason.split(":")[0] for s in record.plan.skipped)
        summary = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3)) or "the model has no 2-D convolution"
        how = "traced" if traced.whole else "not traced as a whole"
        warnings.warn(
            f"kdna_fx found no convolutions to share in {type(module).__name__} ({summary}); the model is "
            f"returned unchanged ({how}). kdna_fx.report(model) lists each conv with its reason; "
            f"KDNAConfig(kernel_sizes=(1, 3), depthwise=True, stage_depth=0) widens the search.",
            NoEligibleConvWarning, stacklevel=2)
    return kmodel


def load_original(kmodel: nn.Module, state_dict: dict[str, Tensor]) -> nn.Module:
    """Load a state dict of the *original* architecture into ``kmodel`` (strict about missing and unexpected
    keys), then start its adapters from the loaded kernels as ``transform`` would have: with
    ``parent="centroid"`` the mean kernel, with ``init="trained"`` identity gates and SVD residuals
    (passes.initialize)."""
    record = record_of(kmodel)
    plan = record.plan
    own = kmodel.state_dict()
    kernels = {m: plan.sites[m].weight for f in plan.families for m in f.members}
    gates = tuple(f"{plan.sites[m].adapter_path}.gate." for m in kernels)  # gate buffers (BatchNorm statistics)
    adapter_keys = {n for n, _ in adapter_parameters(kmodel)} | {k for k in own if k.startswith(gates)}
    missing = sorted(k for k in own if k not in state_dict and k not in adapter_keys)
    unexpected = sorted(k for k in state_dict if k not in own and k not in kernels.values())
    if missing or unexpected:
        raise StateError(f"the state dict does not fit the original of this model: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). Pass the "
                         f"state dict of the untransformed model this one was transformed from.")
    wrong = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if wrong:
        raise StateError(f"{len(wrong)} tensors differ in shape (state dict vs model), e.g. {wrong[:3]}")
    with torch.no_grad():
        for key, value in own.items():
            if key in state_dict:
                value.copy_(state_dict[key])
    return passes.initialize(kmodel, {m: state_dict[w] for m, w in kernels.items()})


def plan_of(kmodel: nn.Module) -> passes.Plan:
    """The plan transform() applied to ``kmodel`` (families and skipped convs, with its config)."""
    return record_of(kmodel).plan


fold = passes.fold
as_function = passes.as_function
