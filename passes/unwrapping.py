"""Pass 0: make sure we were handed a plain nn.Module, not a compiled or data-parallel wrapper."""
from __future__ import annotations

import warnings

from torch import nn

from kdna_fx.carried import unwrapped
from kdna_fx.errors import KDNATypeError, UnwrappedModelWarning
from kdna_fx.datamodel import refuse_converted


def unwrap(model: object) -> nn.Module:
    """Return the plain module inside torch.compile / DataParallel / DistributedDataParallel wrappers.

    Tracing must come before compiling and before wrapping for data parallelism: each wrapper found is
    removed with a warning that says how to re-apply it to the transformed model.
    """
    if not isinstance(model, nn.Module):
        hint = " (a compiled function? pass the nn.Module itself)" if callable(model) else ""
        raise KDNATypeError(f"kdna_fx.transform expects a torch.nn.Module, got {type(model).__name__}{hint}")
    import torch._dynamo.eval_frame as eval_frame

    while True:
        if isinstance(model, eval_frame.OptimizedModule):
            warnings.warn("kdna_fx received a torch.compile'd model; it transforms the original module "
                          "(model._orig_mod). Compile the result: torch.compile(kdna_fx.transform(model)).",
                          UnwrappedModelWarning, stacklevel=3)
            model = unwrapped(model)
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            warnings.warn(f"kdna_fx received a {type(model).__name__}-wrapped model; it transforms "
                          f"model.module. Wrap the transformed model again afterwards.",
                          UnwrappedModelWarning, stacklevel=3)
            model = model.module
        else:
            break
    refuse_converted(model)
    return model
