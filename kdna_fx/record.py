"""What passes.rewrite leaves on a GraphModule (``gm.meta["kdna"]``), read by fold, report, save and load."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import KDNAError


@dataclass
class TransformRecord:
    plan: Any  # kdna_fx.passes.Plan, which carries the KDNAConfig it was made with
    params_before: int
    in_channels: int | None
    """Input channels of the first convolution: the default example input of report()."""
    folded: bool = False
    init: str = "copy"
    """How the adapters started: 'copy' (children are copies of their parent) or 'trained' (converted)."""

    @property
    def config(self) -> dict[str, Any]:
        """The plan's KDNAConfig as a plain dict."""
        return self.plan.config.to_dict()


def record_of(model: nn.Module) -> TransformRecord:
    """The record of a transformed model (or of the model inside a torch.compile wrapper)."""
    record = getattr(model, "meta", {}).get("kdna") if isinstance(model, nn.Module) else None
    if record is None:
        inner = getattr(model, "_orig_mod", None)
        if inner is not None:
            return record_of(inner)
        raise KDNAError(f"{type(model).__name__} is not a kdna_fx-transformed model; "
                        f"call kdna_fx.transform(model) first")
    return record
