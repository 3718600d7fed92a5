"""Training checkpoints: written atomically every epoch, checked against the model before anything is loaded."""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

import torch
from torch import nn

from kdna_fx.errors import CheckpointError, StateError
from kdna_fx.spec import ModelSpec
from kdna_fx.utils import atomic_path

FORMAT = "kdna_fx.train/1"
CHECKPOINT_NAME = "last.pt"


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` through a temporary file, so a crash mid-write never leaves a torn file."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def read_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint written by save_checkpoint (tensors to CPU), with a clear error for every way it fails."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path!r}. Start a new run without resume=True (--resume), or "
                              f"give the run directory you want to continue (run_dir=, --run-dir) or evaluate "
                              f"(kdna eval RUN).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        # torch's own text is not repeated: it advises weights_only=False, which runs any code in the file.
        raise CheckpointError(
            f"cannot read checkpoint {path!r}: the file is truncated or corrupt ({type(exc).__name__}). It was "
            f"probably cut "
            f"off by a full disk or a copy that did not finish. Restore it from a complete copy, or delete it "
            f"and start the run again without resume=True (--resume).") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path!r} is not a kdna training checkpoint (format {found!r}, expected {FORMAT!r}). "
            f"`kdna train` writes <run-dir>/{CHECKPOINT_NAME}; a file from kdna_fx.save is loaded with kdna_fx.load.")
    return ckpt


def model_signature(model: nn.Module) -> dict[str, list[int]]:
    """Name -> shape of every tensor in the state dict: what must match for weights to load."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def check_model_matches(ckpt: dict[str, Any], model: nn.Module, path: str) -> None:
    """Raise CheckpointError naming the differences when ``model`` cannot take the checkpoint's weights."""
    saved: dict[str, list[int]] = ckpt["signature"]
    mine = model_signature(model)
    missing = sorted(set(mine) - set(saved))
    unexpected = sorted(set(saved) - set(mine))
    reshaped = sorted(k for k in set(saved) & set(mine) if saved[k] != mine[k])
    if not (missing or unexpected or reshaped):
        return
    details = []
    if missing:
        details.append(f"{len(missing)} tensors of this model are not in the checkpoint (e.g. {missing[:3]})")
    if unexpected:
        details.append(f"{len(unexpected)} checkpoint tensors have no place in this model (e.g. {unexpected[:3]})")
    if reshaped:
        k = reshaped[0]
        details.append(f"{len(reshaped)} tensors differ in shape (e.g. {k}: checkpoint {saved[k]}, model {mine[k]})")
    raise CheckpointError(
        f"checkpoint {path!r} was written for a different model ({_saved_model(ckpt)}): " + "; ".join(details) +
        ". Build that model (the same name and options: --model, --width, --small-stem, --gate-norm, on data with "
        "the same classes and channels) to resume or evaluate it, or give a new run_dir (--run-dir) to train this "
        "model from scratch.")


def _saved_model(ckpt: dict[str, Any]) -> str:
    """The checkpoint's model as the call that builds it, or "not recorded"."""
    try:
        return str(ModelSpec.from_dict(ckpt.get("config", {}).get("model")))
    except StateError:
        return "not recorded"


def load_model_weights(ckpt: dict[str, Any], model: nn.Module, path: str) -> None:
    """Check and load the checkpoint's model weights into ``model`` (strict)."""
    check_model_matches(ckpt, model, path)
    model.load_state_dict(ckpt["model"], strict=True)
