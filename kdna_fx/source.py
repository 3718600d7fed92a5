"""Where a command's model comes from: a ``kdna train`` run directory (or its checkpoint), a state-dict file, a
``kdna_fx.save`` file or a model name, resolved to a ``Source``: its ``ModelSpec``, weights and data.

Shared by ``kdna eval``, ``kdna convert``, ``kdna cka``, ``kdna export`` and ``kdna plan``.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn

from .data import DataSpec
from .errors import ConfigError, StateError
from .models import is_model, list_models, model_options
from .spec import ZOO_DEFAULTS, ModelSpec
from .state import FORMAT, load
from .train.checkpoint import CHECKPOINT_NAME, read_checkpoint

# Facts of the data: a model that does not take them (a torchvision classifier's channels) is built without them.
_DATA_OPTIONS = ("num_classes", "in_chans")


def model_spec(name: str, **options: Any) -> ModelSpec:
    """The ModelSpec of ``name`` (a kdna_fx.models name, ``torchvision/<name>``, ``timm/<name>``, or a bare
    torchvision builder's name) built with ``options`` (width=, small_stem=, num_classes=, in_chans=, gate_norm=;
    None: the model's default). An option the model does not take is a ConfigError, unless it is a fact of the
    data (num_classes=, in_chans=) or at the zoo's default."""
    if not is_model(name) and name in torchvision.models.list_models():
        name = f"torchvision/{name}"
    takes = model_options(name)  # an unknown name: a ConfigError naming the close ones
    given = {k: v for k, v in options.items() if v is not None}
    refused = [k for k, v in given.items()
               if k not in takes and k not in _DATA_OPTIONS and (k not in ZOO_DEFAULTS or ZOO_DEFAULTS[k] != v)]
    if refused:
        raise ConfigError(f"model {name!r} does not take {', '.join(f'{k}={given[k]!r}' for k in refused)} (it "
                          f"takes {takes}): drop it" + ("; gate_norm= applies to KernelDNA models (.kdna, .replace)"
                                                        if "gate_norm" in refused else ""))
    return ModelSpec(name, {k: v for k, v in given.items() if k in takes})


@dataclass(frozen=True)
class Source:
    """A command's model, resolved: how it is built, the weights it loads, and for a run its checkpoint."""

    where: str
    spec: ModelSpec
    state: dict[str, torch.Tensor] | None = None
    """The weights of a run or a state-dict file; None: a file kdna_fx.load reads, or random weights (a name)."""
    saved: bool = False
    """A kdna_fx.save file (kdna convert's output): loaded with kdna_fx.load."""
    own: bool = False
    """The source records its model (a run, a kdna_fx.save file that records its spec): options do not change it."""
    checkpoint: dict[str, Any] | None = None
    """A run's ``kdna train`` checkpoint (its config, epoch and weights)."""
    data: DataSpec | None = None
    """The data set a run trained on."""

    def fit(self, **options: Any) -> Source:
        """This source with ``options`` (num_classes=, in_chans=: the data's) where it does not record its own."""
        if self.own:
            return self
        return dataclasses.replace(self, spec=model_spec(self.spec.name, **{**self.spec.kwargs, **options}))

    def build(self, seed: int = 0) -> nn.Module:
        """The model, in eval mode: a kdna_fx.save file loaded (onto a fresh model of the spec where the file does
        not rebuild its own), or a fresh model of the spec (weights seeded by ``seed``) that takes the source's."""
        if self.saved and self.own:
            return load(self.where).eval()
        torch.manual_seed(seed)
        model = self.spec.build()
        if self.saved:
            return load(self.where, model).eval()
        if self.state is not None:
            try:
                model.load_state_dict(self.state, strict=True)
            except RuntimeError as exc:
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                why = lines[1] if len(lines) > 1 else lines[0]  # the first line only says "Error(s) in loading"
                raise StateError(f"the weights in {self.where!r} do not fit {self.spec.name} with options "
                                 f"{self.spec.kwargs}: {why[:300]}. Give the options the model was trained with "
                                 f"(--width, --small-stem, --num-classes).") from None
        return model.eval()


def run_source(path: str) -> Source:
    """The Source of a ``kdna train`` run: its directory, or the checkpoint file itself."""
    ckpt = read_checkpoint(os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path)
    return Source(path, ModelSpec.from_dict(ckpt["config"]["model"]), ckpt["model"], own=True, checkpoint=ckpt,
                  data=DataSpec.from_dict(ckpt["config"]["data"]))


def _kdna_metadata(path: str) -> dict[str, str] | None:
    """The metadata of a file written by kdna_fx.save, else None."""
    if not (path.endswith(".safetensors") and os.path.isfile(path)):
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # noqa: BLE001 - not readable as one: _read_state says why
        return None
    return metadata if metadata.get("format") == FORMAT else None


def is_kdna_file(path: str) -> bool:
    """Whether ``path`` was written by kdna_fx.save (a transformed model, reloaded onto its original)."""
    return _kdna_metadata(path) is not None


def saved_spec(path: str) -> ModelSpec | None:
    """How the original of a kdna_fx.save file was built, when the file says so: such a file loads without a
    model, ``kdna_fx.load(path)``."""
    metadata = _kdna_metadata(path) or {}
    return ModelSpec.from_dict(json.loads(metadata["builder"])) if "builder" in metadata else None


def _read_state(path: str) -> dict[str, torch.Tensor]:
    """The state dict in a .pt or .safetensors file."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        # torch's own text is not repeated: it advises weights_only=False, which runs any code in the file.
        raise StateError(f"cannot read {path!r} as a state dict ({type(exc).__name__}): the file is damaged or "
                         f"not a tensor file. Write it again with torch.save(model.state_dict(), path) or "
                         f"safetensors.torch.save_file") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        inner = [k for k, v in state.items() if isinstance(v, dict) and v
                 and all(isinstance(t, torch.Tensor) for t in v.values())] if isinstance(state, dict) else []
        hint = (f"; it is a dict whose {inner[0]!r} holds one (a checkpoint without its format, or a wrapped "
                f"state dict): give a `kdna train` run as its directory, or save that entry alone, "
                f"torch.save(checkpoint[{inner[0]!r}], path)") if inner else ""
        raise StateError(f"{path!r} does not hold a state dict (name -> tensor){hint}")
    return state


def resolve_source(where: str, model: str | None = None, *, like: ModelSpec | None = None,
                   **options: Any) -> Source:
    """SOURCE of a command, or its --compare when ``like`` (SOURCE's spec) is given: a weights file there
    belongs to SOURCE's architecture unless it is a run directory. ``model`` names the architecture of a file
    that does not record it; ``options`` (model_spec's) say how it was built."""
    flag = "--compare" if like else "SOURCE"
    named = like.name if like else model
    if is_kdna_file(where):
        recorded = saved_spec(where)
        if model is None and recorded is not None:  # the file rebuilds its own model (kdna_fx.load(path))
            return Source(where, recorded, saved=True, own=True)
        if named is None:
            raise ConfigError(f"a kdna_fx.save file as {flag} that does not record how its model was built (a model "
                              f"not built by kdna_fx.models.create_model) needs --model NAME (the original "
                              f"architecture it was converted from) and its options")
        return Source(where, like or model_spec(named, **options), saved=True)
    if os.path.isdir(where):
        source = run_source(where)
        if not like and model not in (None, source.spec.name):
            raise ConfigError(f"--model {model!r} differs from the run's model {source.spec.name!r}; drop it or "
                              f"pass the run's name")
        return source
    if os.path.isfile(where):
        if named is None:
            raise ConfigError(f"a state-dict {flag} needs --model NAME (the architecture the weights belong to)")
        return Source(where, like or model_spec(named, **options), _read_state(where))
    if is_model(where) or where in torchvision.models.list_models():
        if not like and model not in (None, where):
            raise ConfigError(f"SOURCE names the model {where!r} but --model says {model!r}; drop --model")
        return Source(where, model_spec(where, **(like.kwargs if like else options)))
    names = list_models(aliases=True) + torchvision.models.list_models(torchvision.models)  # its classifiers
    close = difflib.get_close_matches(where, list(dict.fromkeys(names)), n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ConfigError(f"{flag} {where!r} is neither a `kdna train` run directory, a state-dict or kdna_fx.save file, "
                      f"nor a model name (kdna_fx.models.list_models(), torchvision/<name>, timm/<name>, or a torchvision "
                      f"builder).{hint}")
