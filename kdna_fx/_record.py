"""What transform() leaves on the GraphModule (``gm.meta["kdna"]``) for report, fold, save and load."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import KDNAError


@dataclass
class TransformRecord:
    config: dict[str, Any]
    plan: Any  # kdna_fx.passes.Plan
    params_before: int
    in_channels: int | None
    """Input channels of the first convolution: the default example input of report()."""
    folded: bool = False


def record_of(model: nn.Module) -> TransformRecord:
    record = getattr(model, "meta", {}).get("kdna") if isinstance(model, nn.Module) else None
    if record is None:
        inner = getattr(model, "_orig_mod", None)
        if inner is not None:
            return record_of(inner)
        raise KDNAError(f"{type(model).__name__} is not a kdna_fx-transformed model; "
                        f"call kdna_fx.transform(model) first")
    return record
