"""Saving and reloading transformed models.

A transformed model is saved as its state dict (safetensors: every tensor stored once, under one name)
plus, in the file's metadata, the KDNAConfig, the plan and, when known, how the original was built (its
``kdna_fx.models.ModelSpec``, under the key ``builder``). Reloading replays that plan on a
fresh copy of the original architecture (so models built from edited or hand-written plans reload too) and
loads strictly; a model that is already transformed with the same plan (a zoo model) just takes the tensors.
With a spec stored, ``load(path)`` needs no model: it rebuilds the original (``ModelSpec.build``).

The file is also the deploy form: it stores each shared kernel once (a ResNet-18: 5.7 M parameters, against
12.0 M for a folded model, which stores a kernel per child), and ``load(..., fold=True)`` folds after loading.
"""
from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from .carried import unwrapped
from .config import KDNAConfig
from .errors import KDNAError, StateError
from .spec import ModelSpec, spec_of

from .datamodel import Plan, find_record, record_of

FORMAT = "kdna_fx/1"


def save(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save a transformed (not folded) model, or any model ``kdna_fx.models.create_model`` built (a plain
    network, a peer), to a .safetensors file; how it was built is stored when known (``load(path)``)."""
    from safetensors.torch import save_file

    record, spec = find_record(model), spec_of(model)
    if record is None and spec is None:
        raise StateError(f"{type(model).__name__} is neither a kdna_fx-transformed model nor built by "
                         f"kdna_fx.models.create_model (whose models reload with no model given): save one of "
                         f"those, or save this model's state_dict with torch.save")
    if record is not None and record.folded:
        raise StateError("save the unfolded model and fold after loading (kdna_fx.load(path, model, fold=True)): "
                         "a folded model has no F/S to restore, and stores a kernel per child")
    model = unwrapped(model)
    tensors, aliases, seen = {}, {}, {}
    for key, value in model.state_dict().items():
        # A module registered under two paths (MONAI's DynUNet keeps its blocks in skip_layers too) lists each
        # tensor twice; safetensors refuses shared tensors, so the second name is stored as an alias.
        first = seen.setdefault((value.data_ptr(), value.shape, value.stride()), key) if value.numel() else key
        if first != key:
            aliases[key] = first
        else:
            tensors[key] = value.detach().contiguous()
    metadata = {"format": FORMAT}
    if aliases:
        metadata["aliases"] = json.dumps(aliases)
    if record is not None:
        metadata.update(config=json.dumps(record.config), plan=json.dumps(record.plan.to_dict()), init=record.init)
    if spec is not None:
        metadata["builder"] = json.dumps(spec.to_dict())
    save_file(tensors, os.fspath(path), metadata=metadata)


def load(path: str | os.PathLike[str], model: nn.Module | None = None, *, fold: bool = False) -> nn.Module:
    """The model saved at ``path``, rebuilt on ``model``: a fresh, untransformed instance of the saved
    architecture (transformed here with the saved config and plan), or a transformed one whose plan is the
    saved plan, such as ``kdna_fx.models.create_model(name)``. The saved config says whether the graph form
    was asked for (``rewrite="graph"``) and the plan names convs from its root.

    Without ``model``, the original is rebuilt from the ModelSpec stored with it (a model made by
    ``kdna_fx.models.create_model``: zoo, torchvision or timm); a file without one needs ``model``.

    ``fold=True`` returns the deploy form instead: the loaded model in eval mode, folded (``kdna_fx.fold``),
    so the small shared-form file serves inference directly (docs/deployment.md)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from .api import transform

    where = os.fspath(path)
    try:
        with safe_open(where, framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(where)
    except (SafetensorError, OSError) as exc:
        raise StateError(f"cannot read {where!r} as a safetensors file: {exc}") from None
    if metadata.get("format") != FORMAT:
        raise StateError(f"{where!r} was not written by kdna_fx.save (format {metadata.get('format')!r}, "
                         f"expected {FORMAT!r})")
    if model is None:
        if "builder" not in metadata:
            raise StateError(f"{where!r} does not say how to rebuild its model (it was not built by "
                             f"kdna_fx.models.create_model): pass a fresh instance of the saved architecture, "
                             f"kdna_fx.load(path, model)")
        spec = ModelSpec.from_dict(json.loads(metadata["builder"]))
        try:
            model = spec.build()
        except KDNAError as exc:
            raise StateError(f"{where!r} was saved from {spec.name!r}, which cannot be built here "
                             f"({exc}); pass a fresh instance of it, kdna_fx.load(path, model)") from None
    if "plan" not in metadata:  # a plain network or a peer: the tensors go straight in
        if find_record(model) is not None:
            raise StateError(f"{where!r} holds an untransformed model, but the model given is transformed: pass "
                             f"the architecture that was saved")
        kmodel = model
    elif find_record(model) is not None:
        kmodel = model
        _check_same_plan(json.loads(metadata["plan"]), record_of(kmodel).plan.to_dict(), where)
    else:
        config = KDNAConfig.from_dict(json.loads(metadata["config"]))
        kmodel = transform(model, config, plan=Plan.from_dict(json.loads(metadata["plan"])),
                           init=metadata.get("init", "copy"))
    state.update({key: state[first] for key, first in json.loads(metadata.get("aliases", "{}")).items()})
    try:
        kmodel.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise StateError(f"the tensors saved in {where!r} do not fit the model: {exc}. Pass a fresh instance of "
                         f"the architecture that was saved, built with the same options.") from None
    if fold:
        if "plan" not in metadata:
            raise StateError(f"{where!r} holds an untransformed model: there is nothing to fold (fold=False)")
        from .passes import fold as fold_model

        # The folded form serves inference only: eval mode, so the gates' norms use their running statistics.
        return fold_model(kmodel.eval())
    return kmodel


def _check_same_plan(saved: dict[str, Any], mine: dict[str, Any], where: str) -> None:
    saved_families = {f["parent"]: f["children"] for f in saved["families"]}
    my_families = {f["parent"]: f["children"] for f in mine["families"]}
    if saved_families == my_families:
        return
    diff = [f"{p}: saved {saved_families.get(p)}, model {my_families.get(p)}"
            for p in sorted(set(saved_families) | set(my_families)) if saved_families.get(p) != my_families.get(p)]
    raise StateError(f"the transformed model given to kdna_fx.load does not have the plan saved in {where!r} "
                     f"({len(diff)} families differ, e.g. {'; '.join(diff[:3])}). Pass the untransformed "
                     f"architecture (the saved plan is then replayed on it) or the model the file was saved from.")
