"""Mode 'distill': end-to-end distillation to the reference's outputs, with the per-layer loss on norm outputs."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdna_fx.adapters import adapter_parameters
from kdna_fx.utils import KeptModes

from .bn import batchnorms, reestimate_bn
from .config import NORMS, CalibrationConfig
from .feeder import Batches, Runner, first_output
from .layerwise import children_of


def gram_loss(k: Tensor, r: Tensor) -> Tensor:
    """2 * (1 - linear CKA) between two batches of features [B, ...] of any widths: the squared distance of
    their centred sample-by-sample Gram matrices, each scaled to unit norm (0: the same similarity structure)."""
    gk, gr = (_centred_gram(t) for t in (k, r))
    return (gk / gk.norm().clamp_min(1e-12) - gr / gr.norm().clamp_min(1e-12)).pow(2).sum()


def _centred_gram(t: Tensor) -> Tensor:
    x = t.flatten(1)
    x = x - x.mean(0, keepdim=True)
    return x @ x.T


class _Taps:
    """Forward hooks on the norm layers found at the same path in both models: their outputs, per forward."""

    def __init__(self, kmodel: nn.Module, reference: nn.Module, layer_loss: str = "auto"):
        mine = dict(kmodel.named_modules())
        self.layer_loss = layer_loss
        self.names = [n for n, m in reference.named_modules()
                      if isinstance(m, NORMS) and isinstance(mine.get(n), type(m))]
        self.outputs: dict[str, dict[str, Tensor]] = {"k": {}, "r": {}}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(side, n))
                        for side, model in (("k", kmodel), ("r", reference)) for n in self.names]

    def _hook(self, side: str, name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            self.outputs[side][name] = out
        return hook

    def _term(self, k: Tensor, r: Tensor) -> Tensor | None:
        same = k.shape == r.shape
        if self.layer_loss == "gram" or (self.layer_loss == "auto" and not same):
            return gram_loss(k, r) if k.shape[0] == r.shape[0] else None
        return F.mse_loss(k, r) / r.pow(2).mean().clamp_min(1e-12) if same else None

    def loss(self) -> Tensor | None:
        """Mean over the taps of the per-pair loss (``layer_loss``); a pair "mse" cannot compare is skipped."""
        terms = [t for n in self.names
                 for k, r in [(self.outputs["k"].get(n), self.outputs["r"].get(n))]
                 if k is not None and r is not None
                 for t in [self._term(k, r)] if t is not None]
        self.outputs = {"k": {}, "r": {}}
        return torch.stack(terms).mean() if terms else None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def distill_outputs(kmodel: nn.Module, runner: Runner, data: Batches, config: CalibrationConfig, *,
             generator: torch.Generator, bar: Any) -> int:
    steps, lr, temperature, train = config.steps, config.lr, config.temperature, config.train
    params: dict[int, nn.Parameter] = {id(p): p for _, p in adapter_parameters(kmodel)}
    for m in kmodel.modules():
        if isinstance(m, NORMS):
            for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                if isinstance(p, nn.Parameter):
                    params[id(p)] = p
    adapters_and_norms = set(params)
    if train == "parents":
        for child in children_of(kmodel):
            p = child.weight
            params[id(p)] = p
    if train == "all":
        params = {id(p): p for p in kmodel.parameters()}
    if not params:
        return 0
    flags = [(p, p.requires_grad) for p in kmodel.parameters()]
    for p, _ in flags:
        p.requires_grad_(id(p) in params)
    light = [p for p in params.values() if id(p) in adapters_and_norms]
    weights = [p for p in params.values() if id(p) not in adapters_and_norms]
    groups = [{"params": light}] if light else []
    groups += [{"params": weights, "lr": config.weight_lr or lr}] if weights else []
    opt = torch.optim.Adam(groups, lr=lr)
    done = 0
    taps = _Taps(kmodel, runner.reference, config.layer_loss) if config.features > 0 else None
    try:
        with KeptModes(kmodel):
            kmodel.eval()
            if config.norms == "train":
                for bn in batchnorms(kmodel):
                    bn.train()
            for x in data.stream(generator):
                if done >= steps:
                    break
                r = runner.ref(x)
                k = first_output(kmodel(x), "kmodel")
                if r.dim() == 2:
                    t = temperature
                    loss = F.kl_div(F.log_softmax(k / t, 1), F.log_softmax(r / t, 1), log_target=True,
                                    reduction="batchmean") * t * t
                else:
                    loss = F.mse_loss(k, r) / r.pow(2).mean().clamp_min(1e-12)
                inner = taps.loss() if taps is not None else None
                if inner is not None:
                    loss = loss + config.features * inner
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
                bar.update(1)
    finally:
        if taps is not None:
            taps.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        opt.zero_grad(set_to_none=True)
    if config.norms == "train":
        reestimate_bn(kmodel, data)
    return done
