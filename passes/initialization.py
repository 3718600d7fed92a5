"""Pass 4b: start a rewritten model from the original model's kernels.

Used by ``rewrite`` and by ``kdna_fx.load_original``. Each family's shared kernel becomes the parent's
original kernel, or with ``KDNAConfig(parent="centroid")`` the mean of its members' kernels. With
``init="trained"`` (converting a trained model) the adapters start from the kernels too: every gate becomes the exact
identity (a(x) = 1); each child's low-rank residual B A (AdapterConfig.rank > 0) becomes the truncated SVD
of the difference between its original kernel and its modulated parent kernel, so that at full rank a child
reproduces its original kernel exactly. F and S stay at zero: trained kernels of one stage are nearly
orthogonal, so fitting scales in kernel space buys nothing (see docs/conversion.md); calibration on data
(kdna_fx.calibrate) is what fits them.
"""
from __future__ import annotations

import torch
from torch import Tensor, fx

from kdna_fx import functional as KF
from kdna_fx.adapters import ChildAdapter
from kdna_fx.datamodel import record_of


@torch.no_grad()
def initialize(gm: fx.GraphModule, kernels: dict[str, Tensor]) -> fx.GraphModule:
    """Initialise ``gm`` from ``kernels``: original kernel by conv name (plan member names)."""
    record = record_of(gm)
    plan = record.plan
    if any(k.is_meta for k in kernels.values()):
        return gm  # a model built on the meta device holds no values yet: kdna_fx.load_original starts it later
    for family in plan.families:
        shared = gm.get_parameter(plan.parent_weight(family))
        if plan.config.parent == "centroid":
            shared.copy_(torch.stack([kernels[m] for m in family.members]).mean(0))
        else:
            shared.copy_(kernels[family.parent])
        if record.init != "trained":
            continue
        for name in family.members:
            # A parent that keeps its conv (parent="first") has none: its conv module is there, or for a function
            # conv (F.conv3d inside torchvision's Conv3DSimple, traced into) nothing at all.
            adapter = dict(gm.named_modules()).get(plan.sites[name].adapter_path)
            if not isinstance(adapter, ChildAdapter):
                continue
            if adapter.gate is not None:
                adapter.gate.make_identity()
            if adapter.lowrank_b is not None:
                base = KF.modulate(shared, adapter.filter_scale, adapter.spatial_scale)
                b, a = low_rank_factors(kernels[name].to(base) - base, adapter.lowrank_b.shape[1])
                adapter.lowrank_b.copy_(b)
                adapter.lowrank_a.copy_(a)
    return gm


def low_rank_factors(residual: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """B [C_out, r], A [r, C_in/g*k*k] with B A the best rank-r approximation of ``residual`` (truncated SVD,
    the singular values split evenly between the factors)."""
    matrix = residual.reshape(residual.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = torch.zeros(matrix.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, matrix.shape[1], dtype=torch.float64)
    b[:, :r] = u[:, :r] * root
    a[:r] = root[:, None] * vh[:r]
    return b.to(residual.dtype), a.to(residual.dtype)
