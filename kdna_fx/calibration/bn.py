"""Mode 'bn': re-estimate the running statistics of the model's BatchNorms on the data."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdna_fx.utils import KeptModes

from .feeder import Batches


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate_bn(kmodel: nn.Module, data: Batches, bar: Any = None) -> int:
    """Cumulative-average BatchNorm statistics over one pass of the data; returns the batches used."""
    bns = batchnorms(kmodel)
    if not bns:
        return 0
    momenta = [bn.momentum for bn in bns]
    steps = 0
    with KeptModes(kmodel):
        kmodel.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        try:
            for x in data.batches():
                if x.shape[0] < 2:
                    continue  # a gate's BatchNorm1d cannot take one sample; statistics of one image are poor anyway
                kmodel(x)
                steps += 1
                if bar is not None:
                    bar.update(1)
        finally:
            for bn, m in zip(bns, momenta):
                bn.momentum = m
    return steps
