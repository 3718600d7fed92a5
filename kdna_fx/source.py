"""Where a command's model comes from: a ``kdna train`` run directory, a state-dict file, or an architecture name.

Shared by ``kdna convert`` and ``kdna cka``. A model *spec* is the plain dict ``kdna train`` stores in its
checkpoints: name, width, small_stem, num_classes, in_chans.
"""
from __future__ import annotations

import difflib
import json
import os
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, StateError
from .state import FORMAT, load


def spec_from_options(name: str, *, width: float | None = None, small_stem: bool | None = None,
                      num_classes: int | None = None, in_chans: int = 1) -> dict[str, Any]:
    """The model spec of a source that carries no options of its own (a state dict, a name); the defaults are
    Fashion-MNIST's (10 classes, 1 channel)."""
    return {"name": name, "width": width or 1.0, "small_stem": bool(small_stem), "num_classes": num_classes or 10,
            "in_chans": in_chans}


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
        # torch's own text is not repeated: it advises weights_only=False, which runs any code in the file.
        raise StateError(f"cannot read {source!r} as a state dict ({type(exc).__name__}): the file is damaged or "
                         f"not a tensor file. Write it again with torch.save(model.state_dict(), path) or "
                         f"safetensors.torch.save_file") from None
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
    """The names ``build_original`` lists: the kdna_fx.models zoo (tags and aliases), then torchvision's
    classifiers (it also takes ``torchvision/<name>`` and ``timm/<name>`` for any model of those libraries)."""
    import torchvision

    from .models import list_models

    zoo = list_models(aliases=True)
    return zoo + sorted(set(torchvision.models.list_models(torchvision.models)) - set(zoo))


def is_model_name(name: str) -> bool:
    """Whether ``build_original`` builds ``name``."""
    import torchvision

    from .models import is_model

    return is_model(name) or name in torchvision.models.list_models()


def _kdna_metadata(path: str) -> dict[str, str] | None:
    """The metadata of a file written by kdna_fx.save, else None."""
    if not (path.endswith(".safetensors") and os.path.isfile(path)):
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # noqa: BLE001 - not readable as one: load_source says why
        return None
    return metadata if metadata.get("format") == FORMAT else None


def is_kdna_file(path: str) -> bool:
    """Whether ``path`` was written by kdna_fx.save (a transformed model, reloaded onto its original)."""
    return _kdna_metadata(path) is not None


def saved_builder(path: str) -> dict[str, Any] | None:
    """How the original of a kdna_fx.save file was built (``{"name", "kwargs"}``, kdna_fx.models.builder_of),
    when the file says so: such a file loads without a model, ``kdna_fx.load(path)``."""
    metadata = _kdna_metadata(path) or {}
    return json.loads(metadata["builder"]) if "builder" in metadata else None


def resolve_source(where: str, *, model: str | None = None, width: float | None = None,
                   small_stem: bool | None = None, num_classes: int | None = None,
                   like: dict[str, Any] | None = None) -> tuple[str, dict[str, Any], dict[str, Any], dict | None]:
    """(kind, model spec, data spec, state dict or None) of SOURCE, or of --compare when ``like`` (SOURCE's spec)
    is given: a weights file there belongs to SOURCE's architecture unless it is a run directory."""
    options = {"width": width, "small_stem": small_stem, "num_classes": num_classes}
    given_model = model
    model = like["name"] if like else model
    flag = "--compare" if like else "SOURCE"
    if is_kdna_file(where):
        builder = saved_builder(where)
        if given_model is None and builder is not None:  # the file rebuilds its own model (kdna_fx.load(path))
            return "saved", {"name": builder["name"], **builder["kwargs"]}, {}, None
        if model is None:
            raise ConfigError(f"a kdna_fx.save file as {flag} that does not record its architecture (a model not "
                              f"built by kdna_fx.models.create_model) needs --model NAME (the original "
                              f"architecture it was converted from) and its options")
        return "kdna", like or spec_from_options(model, **options), {}, None
    if os.path.isdir(where) or os.path.isfile(where):
        spec, data, state = load_source(where, None if like and os.path.isdir(where) else model, **options)
        kind = "run" if os.path.isdir(where) else "state"
        return kind, (like if like and kind == "state" else spec), data, state
    if is_model_name(where):
        if not like and given_model not in (None, where):
            raise ConfigError(f"SOURCE names the model {where!r} but --model says {given_model!r}; drop --model")
        return "name", {**(like or spec_from_options(where, **options)), "name": where}, {}, None
    close = difflib.get_close_matches(where, model_names(), n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ConfigError(f"{flag} {where!r} is neither a `kdna train` run directory, a state-dict or kdna_fx.save file, "
                      f"nor a model name (kdna_fx.models.list_models(), torchvision/<name>, timm/<name>, or a torchvision "
                      f"builder).{hint}")


def build_source(kind: str, where: str, spec: dict[str, Any], state: dict | None, seed: int) -> nn.Module:
    """The model of a resolved source (``resolve_source``), in eval mode: built from its spec (a name's weights
    seeded by ``seed``), its state dict loaded strictly, or a kdna_fx.save file loaded onto it (or, for a file
    that records its builder, rebuilt by it)."""
    if kind == "saved":
        return load(where).eval()
    torch.manual_seed(seed)  # the weights of a model given by name
    model = build_original(spec)
    if kind == "kdna":
        return load(where, model)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            options = {k: v for k, v in spec.items() if k != "name"}
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            why = lines[1] if len(lines) > 1 else lines[0]  # the first line only says "Error(s) in loading"
            raise StateError(f"the weights in {where!r} do not fit {spec['name']} with options {options}: "
                             f"{why[:300]}. Give the options the model was trained with "
                             f"(--width, --small-stem, --num-classes).") from None
    return model.eval()
