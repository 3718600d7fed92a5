"""Saving and reloading transformed models.

A transformed model is saved as its state dict (safetensors: every tensor stored once, under one name)
plus, in the file's metadata, the KDNAConfig and the plan. Reloading replays that plan on a fresh copy of
the original architecture (so models built from edited or hand-written plans reload too) and loads
strictly; a model that is already transformed with the same plan (a zoo model) just takes the tensors.

The file is also the deploy form: it stores each shared kernel once (a ResNet-18: 5.7 M parameters, against
12.0 M for a folded model, which stores a kernel per child), and ``load(..., fold=True)`` folds after loading.
"""
from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from .config import KDNAConfig
from .errors import StateError

from .datamodel import Plan, find_record, record_of

FORMAT = "kdna_fx/1"


def save(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save a transformed (not folded) model to a .safetensors file."""
    from safetensors.torch import save_file

    record = record_of(model)
    if record.folded:
        raise StateError("save the unfolded model and fold after loading (kdna_fx.load(path, model, fold=True)): "
                         "a folded model has no F/S to restore, and stores a kernel per child")
    model = getattr(model, "_orig_mod", model)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "config": json.dumps(record.config), "plan": json.dumps(record.plan.to_dict()),
                "init": record.init}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load(path: str | os.PathLike[str], model: nn.Module, *, fold: bool = False) -> nn.Module:
    """The model saved at ``path``, rebuilt on ``model``: a fresh, untransformed instance of the saved
    architecture (transformed here with the saved config and plan), or a transformed one whose plan is the
    saved plan, such as ``kdna_fx.models.create_model(name)``. A model that took the module swap reloads
    the same way: the saved config names the path (``rewrite="swap"``) and the plan names convs from its root.

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
    config = KDNAConfig.from_dict(json.loads(metadata["config"]))
    saved_plan = json.loads(metadata["plan"])
    if find_record(model) is not None:
        kmodel = model
        _check_same_plan(saved_plan, record_of(kmodel).plan.to_dict(), where)
    else:
        kmodel = transform(model, config, plan=Plan.from_dict(saved_plan), init=metadata.get("init", "copy"))
    try:
        kmodel.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise StateError(f"the tensors saved in {where!r} do not fit the model: {exc}. Pass a fresh instance of "
                         f"the architecture that was saved, built with the same options.") from None
    if fold:
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
