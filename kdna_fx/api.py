"""The public phases: plan (inspect, edit) -> transform (rewrite) -> fold (deploy)."""
from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import passes
from ._pipeline import Prepared, prepare
from .adapters import ChildAdapter, adapter_parameters
from .carried import carry_over
from .config import KDNAConfig
from .datamodel import ConvSite, Plan, record_of
from .errors import ConfigError, KDNATypeError, NoEligibleConvWarning, StateError


def _plan(prepared: Prepared, data: object, given: Plan | None) -> Plan:
    """The checked plan of the prepared model: ``given`` adopted, or plan_families (with the convs' output
    similarities measured on ``data`` when the policy needs them). Names run from the model's root."""
    sites, skipped, config = prepared.sites, prepared.skipped, prepared.config
    if given is not None:
        if data is not None:
            raise ConfigError("transform got both plan= and data=; data only chooses the families of a new plan "
                              "(policy='cka'), a given plan already has them")
        plan = passes.adopt(given, sites, skipped, config)
    elif config.policy != "cka":
        if data is not None:
            raise ConfigError("data is only used by KDNAConfig(policy='cka'), which groups convs by measured "
                              "similarity; drop data or set policy='cka'")
        plan = passes.plan_families(sites, skipped, config)
    else:
        plan = passes.plan_families(sites, skipped, config, _similarity(prepared.module, sites, data))
    return passes.check_plan(plan)


def _similarity(module: nn.Module, sites: list[ConvSite], data: object) -> Callable[[str, str], float]:
    """policy='cka': the convs' outputs measured once, on the untransformed model, by their names."""
    if data is None:
        raise ConfigError("KDNAConfig(policy='cka') groups convs by the similarity of their outputs and needs "
                          "calibration images: pass data=images (a tensor [N, C, H, W] or a DataLoader)")
    from .cka import layer_similarity

    names = [s.name for s in sites]
    if len(names) < 2:
        return lambda a, b: 1.0
    measured = layer_similarity(module, data, layers=names, progress=False)
    index = {n: i for i, n in enumerate(measured.names)}
    return lambda a, b: float(measured.matrix[index[a], index[b]])


def plan(model: nn.Module, config: KDNAConfig | None = None, *, data: object = None, example_inputs: Any = None,
         example_kwargs: dict[str, Any] | None = None) -> Plan:
    """The families transform() would build, and every skipped conv with its reason. Changes nothing.

    Edit the result with ``Plan.without`` / ``Plan.with_family`` (or ``to_dict`` -> ``Plan.from_dict``) and
    pass it back as ``transform(model, config, plan=...)``. ``data``: calibration images for
    ``KDNAConfig(policy="cka")`` (the convs' outputs are compared on them with linear CKA). Names run from the
    model's root; ``example_inputs`` as for transform.
    """
    prepared = prepare(model, config, inplace=True, example_inputs=example_inputs, example_kwargs=example_kwargs)
    return _plan(prepared, data, None)


def transform(model: nn.Module, config: KDNAConfig | None = None, *, plan: Plan | None = None,
              init: str = "copy", data: object = None, example_inputs: Any = None,
              example_kwargs: dict[str, Any] | None = None, inplace: bool = False) -> nn.Module:
    """Turn same-shaped 3x3 convs of each stage of ``model`` into KernelDNA families.

    Returns the user's model: each child conv module replaced in place by a ChildAdapter bound to its parent,
    so the model keeps its class, attributes, methods, hooks and Python forward (docs/design.md).
    ``KDNAConfig(rewrite="graph")`` returns its graph form instead (passes.lower: a GraphModule, checked
    against the model on ``example_inputs`` or inferred inputs).

    ``example_inputs``: what the model's forward takes, as for torch.export: a tuple of positional arguments
    (a single tensor or list is taken as the one argument), ``example_kwargs`` for keywords. With them the
    families follow the order in which the convs run on them; without them, the order of a torch.fx trace
    (only read), else registration order.

    ``model`` is deep-copied first, so it stays untouched; ``inplace=True`` skips the copy (for very large
    models). ``plan`` replaces the automatic planning with a given plan (edited, hand-written or saved plan);
    ``config`` then defaults to the plan's own.

    ``init="copy"`` (default, the paper's from-scratch init): each child starts as an exact copy of its
    parent. ``init="trained"`` (converting a trained model): every gate starts as the exact identity
    (``gate_scale`` 2 with fc2 = 0, so a(x) = 1 and the gate still trains), and each child's low-rank
    residual (``AdapterConfig(rank=r)``, ``rank="full"`` reproduces every kernel) starts as the truncated
    SVD of its own kernel minus its parent's. Follow with ``kdna_fx.calibrate`` on unlabeled images.
    ``data``: calibration images for ``KDNAConfig(policy="cka")``, as in ``plan``.
    """
    if init not in ("copy", "trained"):
        raise ConfigError(f"init must be 'copy' (train from scratch) or 'trained' (convert a trained model), "
                          f"got {init!r}")
    if plan is not None and not isinstance(plan, Plan):
        raise KDNATypeError(f"plan must be a kdna_fx.Plan (kdna_fx.plan(...) or Plan.from_dict(...)), "
                            f"got {type(plan).__name__}")
    if config is None and plan is not None:
        config = plan.config
    if init == "trained":
        config = (config if config is not None else KDNAConfig()).map_adapters(
            lambda a: dataclasses.replace(a, gate_scale=2.0))
    prepared = prepare(model, config, inplace=inplace, example_inputs=example_inputs, example_kwargs=example_kwargs)
    module = prepared.module
    checked = _plan(prepared, data, plan)
    kmodel = passes.swap(module, checked, init=init, order=prepared.route.by)
    if not checked.families:
        reasons = Counter(s.reason.split(":")[0] for s in checked.skipped)
        summary = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3)) or "the model has no convolution"
        warnings.warn(
            f"kdna_fx found no convolutions to share in {type(module).__name__} ({summary}); the model is "
            f"returned unchanged. kdna_fx.report(model) lists each conv with its reason; "
            f"KDNAConfig(kernel_sizes=(1, 3), depthwise=True, stage_depth=0) widens the search.",
            NoEligibleConvWarning, stacklevel=2)
    if checked.config.rewrite == "graph":
        kmodel = passes.lower(kmodel, example_inputs, example_kwargs)
    carry_over(model, kmodel)  # how the original was built (create_model), so kdna_fx.load(path) can rebuild it
    return kmodel


def load_original(kmodel: nn.Module, state_dict: dict[str, Tensor]) -> nn.Module:
    """Load a state dict of the *original* architecture into ``kmodel`` (strict about missing and unexpected
    keys), then start its adapters from the loaded kernels as ``transform`` would have: with
    ``parent="centroid"`` the mean kernel, with ``init="trained"`` identity gates and SVD residuals
    (passes.initialization)."""
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
    for module in kmodel.modules():  # fresh adapters, never what to_empty left (a model transformed on meta)
        if isinstance(module, ChildAdapter):
            module.reset_adapters()
    return passes.initialize(kmodel, {m: state_dict[w] for m, w in kernels.items()})


def plan_of(kmodel: nn.Module) -> Plan:
    """The plan transform() applied to ``kmodel`` (families and skipped convs, with its config)."""
    return record_of(kmodel).plan


fold = passes.fold
as_function = passes.as_function
