"""Where a command's model comes from: a ``kdna train`` run directory, a state-dict file, or an architecture name.

Shared by ``kdna convert`` and ``kdna cka``. A model *spec* is the plain dict ``kdna train`` stores in its
checkpoints: name, width, small_stem, num_classes, in_chans.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, StateError


def spec_from_options(name: str, *, width: float | None = None, small_stem: bool | None = None,
                      num_classes: int | None = None) -> dict[str, Any]:
    """The model spec of a source that carries no options of its own (a state dict, a name)."""
    return {"name": name, "width": width or 1.0, "small_stem": bool(small_stem), "num_classes": num_classes or 10,
            "in_chans": 1}


def load_source(source: str, model: str | None = None, *, width: float | None = None,
                small_stem: bool | None = None,
                num_classes: int | None = None) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(model spec, data spec, state dict) of a run directory or a state-dict file (.pt / .safetensors).

    A run directory brings its own model and data; a state dict needs ``model`` (the architecture's name) and
    the options it was built with.
    """
    from .train.checkpoint import CHECKPOINT_NAME, read_checkpoint

    if os.path.isdir(source):
        ckpt = read_checkpoint(os.path.join(source, CHECKPOINT_NAME))
        spec, data = dict(ckpt["config"]["model"]), dict(ckpt["config"]["data"])
        if model not in (None, spec["name"]):
            raise ConfigError(f"--model {model!r} differs from the run's model {spec['name']!r}; drop it or "
                              f"pass the run's name")
        return spec, data, ckpt["model"]
    if not os.path.isfile(source):
        raise ConfigError(f"{source!r} is neither a `kdna train` run directory nor a state-dict file")
    if model is None:
        raise ConfigError("a state-dict SOURCE needs --model NAME (the architecture the weights belong to)")
    try:
        if source.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(source)
        else:
            state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise StateError(f"cannot read {source!r} as a state dict: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StateError(f"{source!r} does not hold a state dict (name -> tensor)")
    spec = spec_from_options(model, width=width, small_stem=small_stem, num_classes=num_classes)
    return spec, {"dataset": "fashion-mnist", "path": None}, state


def build_original(spec: dict[str, Any]) -> nn.Module:
    """A freshly initialised model of ``spec`` through kdna_fx.models.create_model: a zoo name, an alias,
    ``torchvision/<name>`` or ``timm/<name>``; a bare name the zoo does not know is torchvision's."""
    import torchvision

    from .models import is_model
    from .train.models import build_model

    name = spec["name"]
    if not is_model(name) and name in torchvision.models.list_models():
        # as before the zoo took torchvision/ names: only num_classes (the data feeder adapts the channels)
        spec = {"name": f"torchvision/{name}", "num_classes": spec["num_classes"]}
    elif not is_model(name):
        raise ConfigError(f"unknown model {name!r}: neither a kdna_fx.models name (kdna_fx.models.list_models(), "
                          f"torchvision/<name>, timm/<name>) nor a torchvision builder")
    return build_model(spec)


def model_names() -> list[str]:
    """Every name ``build_original`` accepts: the kdna_fx.models zoo, then torchvision's classifiers."""
    import torchvision

    from .models import list_models

    zoo = list_models()
    return zoo + sorted(set(torchvision.models.list_models(torchvision.models)) - set(zoo))
