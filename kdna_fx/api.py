"""The public phases: plan (inspect, edit) -> transform (rewrite) -> fold (deploy)."""
from __future__ import annotations

import copy
import dataclasses
import warnings
from collections import Counter

import torch
from torch import Tensor, fx, nn

from . import passes
from .config import KDNAConfig
from .adapters import adapter_parameters
from .errors import ConfigError, KDNATypeError, NoEligibleConvWarning, StateError
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


def _families(module: nn.Module, gm: fx.GraphModule, config: KDNAConfig, data: object) -> passes.Plan:
    """plan_families, with the convs' output similarities measured on ``data`` when the policy needs them."""
    sites, skipped = passes.find_convs(gm, config)
    if config.policy != "cka":
        if data is not None:
            raise ConfigError("data is only used by KDNAConfig(policy='cka'), which groups convs by measured "
                              "similarity; drop data or set policy='cka'")
        return passes.plan_families(sites, skipped, config)
    if data is None:
        raise ConfigError("KDNAConfig(policy='cka') groups convs by the similarity of their outputs and needs "
                          "calibration images: pass data=images (a tensor [N, C, H, W] or a DataLoader)")
    from .cka import layer_similarity

    names = [s.name for s in sites]
    measured = layer_similarity(module, data, layers=names, progress=False) if len(names) > 1 else None
    index = {n: i for i, n in enumerate(measured.names)} if measured is not None else {}

    def similarity(a: str, b: str) -> float:
        return float(measured.matrix[index[a], index[b]])  # type: ignore[union-attr]

    return passes.plan_families(sites, skipped, config, similarity)


def plan(model: nn.Module, config: KDNAConfig | None = None, *, data: object = None) -> passes.Plan:
    """The families transform() would build, and every skipped conv with its reason. Changes nothing.

    Edit the result with ``Plan.without`` / ``Plan.with_family`` (or ``to_dict`` -> ``Plan.from_dict``) and
    pass it back as ``transform(model, config, plan=...)``. ``data``: calibration images for
    ``KDNAConfig(policy="cka")`` (the convs' outputs are compared on them with linear CKA).
    """
    module, gm, config = _prepare(model, config, inplace=True)
    return passes.check_plan(gm, _families(module, gm, config, data))


def transform(model: nn.Module, config: KDNAConfig | None = None, *, plan: passes.Plan | None = None,
              init: str = "copy", data: object = None, inplace: bool = False) -> fx.GraphModule:
    """Trace ``model`` and turn same-shaped 3x3 convs of each stage into KernelDNA families.

    Returns a GraphModule. ``model`` is deep-copied first, so it stays untouched; ``inplace=True`` skips
    the copy (for very large models) and the result then shares its remaining parameters and leaf modules
    with ``model``. ``plan`` replaces the automatic planning with a given plan (edited, hand-written or
    saved plan); ``config`` then defaults to the plan's own.

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
    module, gm, config = _prepare(model, config, inplace)
    if plan is None:
        chosen = _families(module, gm, config, data)
    else:
        if data is not None:
            raise ConfigError("transform got both plan= and data=; data only chooses the families of a new plan "
                              "(policy='cka'), a given plan already has them")
        chosen = passes.adopt(plan, *passes.find_convs(gm, config), config)
    chosen = passes.check_plan(gm, chosen)
    if not chosen.families:
        reasons = Counter(s.reason.split(":")[0] for s in chosen.skipped)
        summary = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3)) or "the model has no 2-D convolution"
        warnings.warn(
            f"kdna_fx found no convolutions to share in {type(module).__name__} ({summary}); the model is "
            f"returned unchanged (traced). kdna_fx.report(model) lists each conv with its reason; "
            f"KDNAConfig(kernel_sizes=(1, 3), depthwise=True, stage_depth=0) widens the search.",
            NoEligibleConvWarning, stacklevel=2)
    return passes.rewrite(gm, chosen, init=init)


def load_original(kmodel: fx.GraphModule, state_dict: dict[str, Tensor]) -> fx.GraphModule:
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
