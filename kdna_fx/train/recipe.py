"""The optimisation recipe: parameter groups, optimiser, warm-up + cosine schedule, mixed precision, seeds."""
from __future__ import annotations

import contextlib
import math
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from kdna_fx.adapters import adapter_parameters
from kdna_fx.errors import ConfigError

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def param_groups(model: nn.Module, weight_decay: float, adapter_weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Three optimiser groups: ``decay`` (conv/linear weights), ``no_decay`` (norm affine parameters and all
    biases, including those inside gates), ``adapter`` (F, S and gate weights, with ``adapter_weight_decay``).

    A parent kernel shared by several children is one Parameter and is listed once (named_parameters
    removes duplicates), so it appears in exactly one group.
    """
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    adapter = {id(p) for _, p in adapter_parameters(model)}
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "adapter": []}
    names: dict[str, list[str]] = {k: [] for k in groups}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in norm_params or name.endswith("bias"):
            key = "no_decay"
        elif id(p) in adapter:
            key = "adapter"
        elif p.ndim <= 1:  # other per-channel scales (layer scale and the like)
            key = "no_decay"
        else:
            key = "decay"
        groups[key].append(p)
        names[key].append(name)
    decay = {"decay": weight_decay, "no_decay": 0.0, "adapter": adapter_weight_decay}
    return [{"params": groups[k], "weight_decay": decay[k], "group_name": k, "param_names": names[k]}
            for k in groups if groups[k]]


def build_optimizer(groups: list[dict[str, Any]], name: str, lr: float, *, momentum: float = 0.9,
                    nesterov: bool = False, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over ``groups``; each group keeps its own weight decay."""
    # param_names is for humans and reports; optimisers reject unknown group keys only in strict subclasses,
    # but keeping it out of the state dict keeps checkpoints small.
    clean = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    if name == "sgd":
        return torch.optim.SGD(clean, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(clean, lr=lr, betas=betas)
    raise ConfigError(f"unknown optimizer {name!r}; choose 'sgd' or 'adamw'")


class WarmupCosine:
    """Per-step learning rate: linear warm-up from ``warmup_start * lr`` to ``lr``, then cosine to ``min_lr``.

    The rate lives only in ``optimizer.param_groups[i]['lr']`` (scaled per group from its ``initial_lr``) and the
    step count in this object's state dict. Nothing the compiled model reads changes, so torch.compile never
    recompiles because of the schedule.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 min_lr: float = 0.0, warmup_start: float = 0.01):
        if total_steps < 1:
            raise ConfigError(f"the schedule needs at least one step, got total_steps={total_steps}")
        self.optimizer = optimizer
        self.total_steps, self.warmup_steps = total_steps, min(max(0, warmup_steps), total_steps)
        self.min_lr, self.warmup_start = min_lr, warmup_start
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        """Multiplier of the base rate at ``step`` (0-based); min_lr is handled in _apply."""
        if step < self.warmup_steps:
            return self.warmup_start + (1 - self.warmup_start) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        f = self.factor(self.step_count)
        for group in self.optimizer.param_groups:
            base = group["initial_lr"]
            lr = base * f if self.step_count < self.warmup_steps else self.min_lr + (base - self.min_lr) * f
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "min_lr": self.min_lr, "warmup_start": self.warmup_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("total_steps", "warmup_steps"):
            if state[key] != getattr(self, key):
                raise ConfigError(f"schedule mismatch: checkpoint has {key}={state[key]}, this run "
                                 f"{getattr(self, key)} (different epochs, batch size or data size)")
        self.step_count = int(state["step_count"])
        self._apply()


# ---- mixed precision ----------------------------------------------------------------------------------
AMP_CHOICES = ("auto", "none", "bf16", "fp16")


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None: full fp32). 'auto' is bf16/fp16 on CUDA, fp32 on CPU."""
    if amp not in AMP_CHOICES:
        raise ConfigError(f"amp= (--amp) must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "none":
        return None
    if device.type == "cuda":
        if amp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if amp == "auto":
        return None  # CPU autocast is opt-in: bf16 on CPUs without native support is slower than fp32
    if amp == "fp16":
        raise ConfigError("amp='fp16' (--amp fp16) needs a CUDA device; on CPU use amp='bf16' or 'none'")
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
    return torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)


# ---- seeds and RNG state ------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from, in a form torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


def _tuples(value: Any) -> Any:
    # random.setstate wants tuples all the way down; serialisation may have turned them into lists.
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
