"""report(): what transform() did, as readable tables and as data."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .adapters import Gate
from .tables import format_table
from .record import record_of


@dataclass
class Report:
    """Families, skipped convs, parameters and MACs before/after (shared kernels counted once)."""

    model: str
    input_shape: tuple[int, ...]
    families: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    folded: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        from kdna_fx.passes import Plan

        plan = Plan.from_dict({"families": self.families, "skipped": self.skipped})
        shape = "x".join(map(str, self.input_shape))
        summary = format_table(["", "before", "after", "change"], [
            ["parameters", f"{self.params_before:,}", f"{self.params_after:,}",
             _change(self.params_before, self.params_after)],
            [f"MACs @ {shape}", _si(self.macs_before), _si(self.macs_after),
             _change(self.macs_before, self.macs_after)],
        ], title=f"kdna_fx report: {self.model}" + (" (folded for inference)" if self.folded else ""))
        note = ("MACs count convolutions and matrix products (torch.utils.flop_counter); elementwise gating and "
                "modulation are not counted.")
        return f"{summary}\n{note}\n\n{plan.table()}"


def _change(before: int, after: int) -> str:
    return f"{100.0 * (after - before) / before:+.1f}%" if before else "-"


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {unit}"
    return str(int(n))


def count_macs(model: nn.Module, example_input: Tensor) -> tuple[int, int]:
    """(total MACs, MACs inside adapter gates) of one eval-mode forward pass."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example_input)
    finally:
        model.train(was_training)
    gates = {name for name, m in model.named_modules() if isinstance(m, Gate)}
    # The counter names modules by path from the root, prefixed with the root's class name.
    gate_flops = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                     if name.partition(".")[2] in gates)
    return counter.get_total_flops() // 2, gate_flops // 2


def report(model: nn.Module, example_input: Tensor | None = None) -> Report:
    """Report on a transformed model. ``example_input`` defaults to one 224x224 image.

    MACs before are those of the original graph: the transformed graph runs the same convolutions with
    the same shapes, plus the gates, whose MACs are counted separately and subtracted.
    """
    record = record_of(model)
    model = getattr(model, "_orig_mod", model)
    if example_input is None:
        example_input = torch.randn(1, record.in_channels or 3, 224, 224)
    first = next(iter(model.parameters()), None)
    if first is not None:
        example_input = example_input.to(device=first.device, dtype=first.dtype)
    macs_after, gate_macs = count_macs(model, example_input)
    plan = record.plan.to_dict()
    return Report(
        model=type(model).__name__, input_shape=tuple(example_input.shape),
        families=plan["families"], skipped=plan["skipped"],
        params_before=record.params_before, params_after=sum(p.numel() for p in model.parameters()),
        macs_before=macs_after - gate_macs, macs_after=macs_after, folded=record.folded,
    )
