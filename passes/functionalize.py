"""The transformed model as a pure function of (parent kernels, parameters, buffers, input)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, fx
from torch.func import functional_call

from kdna_fx.datamodel import record_of


@dataclass
class FunctionalModel:
    """``fn(parents, params, buffers, x)``: every parent kernel is one named input.

    ``parents`` holds the shared kernels (named as in the state dict), ``params`` every other parameter,
    ``buffers`` the buffers; all three default to the module's current tensors. Works with
    torch.func.grad, vmap (e.g. over a stack of parent kernels) and jacrev.
    """

    module: fx.GraphModule
    parents: dict[str, Tensor]
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]

    def __call__(self, parents: dict[str, Tensor], params: dict[str, Tensor], buffers: dict[str, Tensor],
                 *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.module, (params, buffers, parents), args, kwargs, strict=True)


def as_function(gm: fx.GraphModule) -> FunctionalModel:
    """Split ``gm``'s state into parent kernels, other parameters and buffers."""
    plan = record_of(gm).plan
    parent_names = {plan.parent_weight(f) for f in plan.families}
    params = dict(gm.named_parameters())
    return FunctionalModel(
        module=gm,
        parents={n: p for n, p in params.items() if n in parent_names},
        params={n: p for n, p in params.items() if n not in parent_names},
        buffers=dict(gm.named_buffers()),
    )
