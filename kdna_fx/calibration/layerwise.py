"""Mode 'layerwise': child by child, fit each child's adapter to the output of the conv at its path in the
reference."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdna_fx.adapters import ChildAdapter
from kdna_fx.datamodel import children
from kdna_fx.errors import KDNAError
from kdna_fx.utils import KeptModes

from .bn import reestimate_bn
from .feeder import Batches, Runner


class _Stop(Exception):
    def __init__(self, value: Tensor):
        super().__init__("stop")
        self.value = value


@dataclass
class _Child:
    """One child conv of a transformed model."""

    name: str
    adapter: ChildAdapter
    weight: Tensor
    """The parent kernel it reads."""

    def input(self, kmodel: nn.Module, x: Tensor) -> Tensor:
        """The child's input when ``kmodel`` runs on x."""
        def stop(module: nn.Module, args: tuple[Any, ...]) -> None:
            raise _Stop(args[0])

        handle = self.adapter.register_forward_pre_hook(stop)
        try:
            kmodel(x)
        except _Stop as stopped:
            return stopped.value
        finally:
            handle.remove()
        raise KDNAError(f"calibrate: the child conv {self.name} was not reached")


def children_of(kmodel: nn.Module) -> list[_Child]:
    """Every unfolded child conv of ``kmodel``, in module order."""
    return [_Child(name, m, m.parent_kernel) for name, m, _ in children(kmodel) if m.folded_weight is None]


def fit_children(kmodel: nn.Module, runner: Runner, data: Batches, *, steps: int, lr: float,
               generator: torch.Generator, bar: Any) -> tuple[int, dict[str, tuple[float, float]]]:
    reference = runner.reference
    ref_modules = dict(reference.named_modules())
    done, errors = 0, {}
    for child in children_of(kmodel):
        name, adapter = child.name, child.adapter
        target = ref_modules.get(name)
        if not isinstance(adapter, ChildAdapter) or not isinstance(target, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue  # no conv at that path in the reference: nothing to match
        weight = child.weight.detach()
        # Inputs from kmodel (so each child corrects the error before it), targets from the reference.
        captured: list[Tensor] = []
        hook = target.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
        pairs = []
        try:
            with KeptModes(kmodel), torch.no_grad():
                kmodel.eval()
                for x in data.batches():
                    captured.clear()
                    runner.ref(x)
                    pairs.append((child.input(kmodel, x), captured[0].to(x.device, x.dtype)))
        finally:
            hook.remove()
        params = [p for p in adapter.parameters() if p is not adapter.bias and p is not adapter.held_weight]
        if not params:
            continue

        def error() -> float:
            with torch.no_grad():
                d = sum(float((adapter(i, weight) - t).double().pow(2).sum()) for i, t in pairs)
                n = sum(float(t.double().pow(2).sum()) for _, t in pairs)
            return (d / max(n, 1e-300)) ** 0.5

        with KeptModes(kmodel):
            kmodel.eval()  # gate norms use their running statistics: a fixed affine while fitting
            before = error()
            opt = torch.optim.Adam(params, lr=lr)
            for _ in range(steps):
                i, t = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
                loss = F.mse_loss(adapter(i, weight), t) / t.pow(2).mean().clamp_min(1e-12)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
                bar.update(1)
            errors[name] = (before, error())
        reestimate_bn(kmodel, data)
    return done, errors
