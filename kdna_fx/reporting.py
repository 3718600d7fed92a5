"""report(): what a conversion did and what it costs, as readable tables and as data; the one Report type and
the one MAC counter (count_macs) for kdna_fx.transform and the kdna_fx.peers conversions alike."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .adapters import ChildAdapter
from .utils import KeptModes, to_model
from .tables import format_table
from .carried import unwrapped
from .datamodel import Plan, peer_record, record_of

KERNELDNA = "KernelDNA"
"""``Report.method`` of a model made by kdna_fx.transform; a peer's report names its method ("ODConv 1x")."""
ADDS_MACS = "kdna_adds_macs"
"""Class attribute (True) of the modules a conversion adds around a convolution: KernelDNA's gates, the peers'
layers. Their MACs other than convolutions are the conversion's overhead (count_macs)."""


@dataclass
class Report:
    """What a conversion did and what it costs: kdna_fx.report (any converted model) and kdna_fx.peers.describe
    both give one. Families (KernelDNA only), skipped convs, parameters and MACs before/after (shared kernels
    counted once); ``method`` says which conversion, ``converted`` which convs it changed."""

    model: str
    input_shape: tuple[int, ...]
    families: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    folded: bool = False
    order: str = "registration"
    """What ordered the convs, so which member of a family is its parent (TransformRecord.order)."""
    method: str = KERNELDNA
    """The conversion: "KernelDNA" (kdna_fx.transform) or the peer's name, e.g. "ODConv 1x"."""
    converted: list[str] = field(default_factory=list)
    """The convs the conversion changed (KernelDNA: the children; a peer: every conv it swapped)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        if self.method != KERNELDNA:
            table = cost_table(self.params_before, self.params_after, self.macs_before, self.macs_after, shape,
                               f"kdna_fx.peers: {self.method}, {len(self.converted)} convs converted")
            note = ("MACs: convolutions and matrix products (torch.utils.flop_counter), the attention heads and "
                    "the kernel mixture included; elementwise attention products are not counted.")
            skipped = [f"  skipped {s['name']}: {s['reason']}" for s in self.skipped]
            return "\n".join([table, note, *skipped])
        plan = Plan.from_dict({"families": self.families, "skipped": self.skipped})
        summary = cost_table(self.params_before, self.params_after, self.macs_before, self.macs_after, shape,
                             f"kdna_fx report: {self.model}" + (" (folded for inference)" if self.folded else ""))
        note = ("MACs count convolutions and matrix products (torch.utils.flop_counter); elementwise gating and "
                "modulation are not counted.")
        return f"{summary}\n{note}\nconvs ordered by: {self.order}\n\n{plan.table()}"


def _change(before: int, after: int) -> str:
    return f"{100.0 * (after - before) / before:+.1f}%" if before else "-"


def cost_table(params_before: int, params_after: int, macs_before: int, macs_after: int, shape: str,
               title: str) -> str:
    """Parameters and MACs before and after a rewrite, with the change, as a text table."""
    return format_table(["", "before", "after", "change"], [
        ["parameters", f"{params_before:,}", f"{params_after:,}", _change(params_before, params_after)],
        [f"MACs @ {shape}", _si(macs_before), _si(macs_after), _change(macs_before, macs_after)],
    ], title=title)


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {unit}"
    return str(int(n))


def flop_counts(model: nn.Module, example_input: Tensor | list[Tensor]) -> tuple[int, dict[str, dict[Any, int]]]:
    """(total FLOPs, FLOPs per op of every module, keyed by module path from the root) of one eval-mode,
    no-grad forward pass; every module's training flag is restored (frozen BatchNorms stay in eval)."""
    with KeptModes(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()
        model(example_input)
    # The counter names modules by path from the root, prefixed with the root's class name.
    return counter.get_total_flops(), {name.partition(".")[2]: ops for name, ops in counter.get_flop_counts().items()}


def count_macs(model: nn.Module, example_input: Tensor | list[Tensor]) -> tuple[int, int]:
    """(total MACs, MACs the conversion adds) of one eval-mode forward pass: the added MACs are those, other than
    convolutions, inside the modules marked ``kdna_adds_macs`` (KernelDNA's gates; the peers' attention heads and
    kernel mixtures). A peer's per-sample grouped conv counts exactly as the conv it replaced (the counter
    multiplies the grouped kernel [B*C_out, ...] by the input batch 1), so total minus added is the original's."""
    total, by_module = flop_counts(model, example_input)
    marked = {name for name, m in model.named_modules() if getattr(m, ADDS_MACS, False)}
    added = sum(flops for name, ops in by_module.items() if name in marked
                for op, flops in ops.items() if op is not torch.ops.aten.convolution)
    return total // 2, added // 2


def thop_custom_ops() -> dict[type, Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]]:
    """``custom_ops`` for thop's ``profile`` (ultralytics-thop, which Ultralytics' ``model.info()`` runs):
    thop counts only the module types it knows, so without it each KernelDNA child's convolution counts 0 MACs
    (0.43x of a ResNet-18's). With it a child counts as the conv it replaced; thop counts the gate's layers.
    ``torch.utils.flop_counter`` (and count_macs) needs nothing: it counts the convolutions that run."""
    return {ChildAdapter: _count_child_macs}


def _count_child_macs(child: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    kh, kw = child.kernel_size
    child.total_ops += output.numel() * (child.in_channels // child.groups) * kh * kw


def report(model: nn.Module, example_input: Tensor | list[Tensor] | None = None) -> Report:
    """Report on a converted model: made by kdna_fx.transform, or by a kdna_fx.peers conversion.
    ``example_input`` defaults to one 224x224 image; a model whose forward takes a list of images
    (torchvision's detection models) takes a list (its first image gives the shape).

    MACs before are those of the original graph: the converted graph runs the same convolutions with the same
    shapes, plus what the conversion adds (count_macs), which is subtracted.
    """
    peer = peer_record(model)
    record = record_of(model) if peer is None else None
    model = unwrapped(model)
    if example_input is None:
        in_channels = (peer or record).in_channels  # type: ignore[union-attr]
        example_input = torch.randn(1, in_channels or 3, 224, 224)
    example_input = to_model(example_input, model)
    shape = tuple((example_input if isinstance(example_input, Tensor) else example_input[0]).shape)
    macs_after, added = count_macs(model, example_input)
    common = dict(model=type(model).__name__, input_shape=shape, params_after=sum(p.numel() for p in model.parameters()),
                  macs_before=macs_after - added, macs_after=macs_after)
    if peer is not None:
        return Report(**common, families=[], skipped=[{"name": s.name, "reason": s.reason} for s in peer.skipped],
                      params_before=peer.params_before, method=peer.method, converted=list(peer.converted))
    plan = record.plan.to_dict()
    return Report(**common, families=plan["families"], skipped=plan["skipped"], params_before=record.params_before,
                  folded=record.folded, order=record.order,
                  converted=[c for f in record.plan.families for c in f.children])
