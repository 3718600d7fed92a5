"""Saving and reloading transformed models.

A transformed model is saved as its state dict (safetensors: every tensor stored once, under one name)
plus, in the file's metadata, the KDNAConfig and the plan. Reloading re-runs transform() on a fresh copy
of the original architecture with that config, checks the plan is the same, and loads strictly.
"""
from __future__ import annotations

import json
import os
from typing import Any

from torch import fx, nn

from ._record import record_of
from .config import KDNAConfig
from .errors import StateError

FORMAT = "kdna_fx/1"


def save(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save a transformed (not folded) model to a .safetensors file."""
    from safetensors.torch import save_file

    record = record_of(model)
    if record.folded:
        raise StateError("save the unfolded model and fold after loading: a folded model has no F/S to restore")
    model = getattr(model, "_orig_mod", model)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "config": json.dumps(record.config), "plan": json.dumps(record.plan.to_dict())}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load(path: str | os.PathLike[str], model: nn.Module, **transform_kwargs: Any) -> fx.GraphModule:
    """Rebuild a saved transformed model from a fresh, untransformed ``model`` of the same architecture."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from .api import transform

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(os.fspath(path))
    except (SafetensorError, OSError) as exc:
        raise StateError(f"cannot read {os.fspath(path)!r} as a safetensors file: {exc}") from None
    if metadata.get("format") != FORMAT:
        raise StateError(f"{os.fspath(path)!r} was not written by kdna_fx.save (format "
                         f"{metadata.get('format')!r}, expected {FORMAT!r})")
    config = KDNAConfig.from_dict(json.loads(metadata["config"]))
    kmodel = transform(model, config, **transform_kwargs)
    saved_plan, plan = json.loads(metadata["plan"]), record_of(kmodel).plan.to_dict()
    if saved_plan != plan:
        raise StateError("the model given to kdna_fx.load does not produce the saved plan (a different "
                         f"architecture?): saved {len(saved_plan['families'])} families, this model gives "
                         f"{len(plan['families'])}. Pass a fresh instance of the architecture that was saved.")
    try:
        kmodel.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise StateError(f"the saved tensors do not fit the transformed model: {exc}") from None
    return kmodel
