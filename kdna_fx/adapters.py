"""Thin nn.Module holders for adapter parameters. All the math lives in kdna_fx.functional."""
from __future__ import annotations

import math
from typing import Any, ClassVar, Iterator, get_args

import torch
from torch import Tensor, nn

from . import functional as KF
from .errors import ChildWeightError, ConfigError, KDNAError

GATE_NORMS: tuple[str, ...] = get_args(KF.GateNorm)
ADAPTER_TENSORS = ("filter_scale", "spatial_scale", "lowrank_b", "lowrank_a")
"""A ChildAdapter's own kernel modulation tensors, in the order child_conv takes them."""
KernelSize = tuple[int, ...]
"""A conv's kernel size, one entry per spatial dim: (k,), (kh, kw) or (kd, kh, kw)."""


def check_gate_norm(norm: object) -> KF.GateNorm:
    """``norm`` itself when it names a gate norm, else a ConfigError that lists the choices."""
    if norm not in GATE_NORMS:
        raise ConfigError(f"gate_norm must be one of {GATE_NORMS} ('layer' or 'none' train at batch size 1), "
                          f"got {norm!r}")
    return norm  # type: ignore[return-value]


def gate_width(channels: int, reduction: int, min_hidden: int = 1) -> int:
    """Hidden width of the gate: channels // reduction, never below ``min_hidden`` nor below 1."""
    return max(1, min_hidden, channels // reduction)


def full_rank(out_channels: int, in_channels: int, kernel_size: KernelSize, groups: int = 1) -> int:
    """The rank of a full kernel residual: the kernel seen as a [C_out, C_in/g * prod(kernel_size)] matrix."""
    return min(out_channels, in_channels // groups * math.prod(kernel_size))


def has_spatial_scale(kernel_size: KernelSize) -> bool:
    """Whether a child of this kernel size gets S: not for a kernel of all ones (1, 1x1, 1x1x1), where S and F
    would scale the same thing."""
    return any(k != 1 for k in kernel_size)


def effective_rank(rank: int | str, out_channels: int, in_channels: int, kernel_size: KernelSize,
                   groups: int = 1) -> int:
    """The low-rank residual's rank for one conv: ``rank`` clamped to the conv's full rank; "full" is that rank.

    Clamped rather than refused, because one global rank serves convs of many sizes: a rank above a small
    conv's full rank adds parameters and no expressiveness."""
    full = full_rank(out_channels, in_channels, kernel_size, groups)
    return full if rank == "full" else min(int(rank), full)


def adapter_cost(in_channels: int, out_channels: int, kernel_size: KernelSize, *, gate: bool = True,
                 reduction: int = 4, gate_norm: str = "batch", gate_min_hidden: int = 1,
                 filter_scale: bool = True, spatial_scale: bool = True, rank: int | str = 0,
                 gate_scale: float = 1.0, groups: int = 1) -> int:
    """Parameters a ChildAdapter adds (bias excluded: the child keeps the one it had)."""
    cost = out_channels if filter_scale else 0
    rank = effective_rank(rank, out_channels, in_channels, kernel_size, groups)
    cost += rank * (out_channels + in_channels // groups * math.prod(kernel_size))
    cost += math.prod(kernel_size) if spatial_scale and has_spatial_scale(kernel_size) else 0
    if gate:
        hidden = gate_width(in_channels, reduction, gate_min_hidden)
        cost += 2 * in_channels * hidden + in_channels + (2 * hidden if gate_norm != "none" else 0)
    return cost


class Gate(nn.Module):
    """Holds the gate's layers, fc1 (no bias) -> norm -> relu -> fc2 (bias) -> sigmoid; kdna_fx.functional.gate
    does the math. The norm is called as a module, so nn.SyncBatchNorm.convert_sync_batchnorm reaches it."""

    kdna_adds_macs: ClassVar[bool] = True
    """Its MACs other than convolutions are the conversion's overhead (kdna_fx.reporting.count_macs)."""

    def __init__(self, channels: int, reduction: int = 4, norm: KF.GateNorm = "batch", min_hidden: int = 1,
                 scale: float = 1.0):
        super().__init__()
        hidden = gate_width(channels, reduction, min_hidden)
        self.scale = float(scale)
        self.norm_kind = check_gate_norm(norm)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.norm: nn.Module = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}.get(norm, nn.Identity)(hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.norm_kind == "batch":
            x = KF.require_batch_statistics(x)
        return KF.gate(x, self.fc1.weight, self.fc2.weight, self.fc2.bias,
                       None if self.norm_kind == "none" else self.norm, self.scale, self.fc1.bias)

    def fold_norm(self) -> bool:
        """Fold an eval-mode BatchNorm into fc1 (a weight and a bias) and drop it: one op less per gate at
        inference, exact for the stored running statistics. A LayerNorm depends on each sample and stays.
        Returns whether the norm was folded; the gate is then for inference only (kdna_fx.fold)."""
        if self.norm_kind != "batch" or not isinstance(self.norm, nn.BatchNorm1d):
            return False
        bn = self.norm
        if bn.running_mean is None or bn.running_var is None:
            return False  # no running statistics: eval mode normalises with batch statistics
        with torch.no_grad():
            inv = torch.rsqrt(bn.running_var + bn.eps)
            scale = inv * bn.weight if bn.weight is not None else inv
            shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0)
            fc1 = nn.Linear(self.fc1.in_features, self.fc1.out_features, bias=True).to(self.fc1.weight)
            fc1.weight.copy_(self.fc1.weight * scale[:, None])
            fc1.bias.copy_(shift)
        self.fc1, self.norm, self.norm_kind = fc1, nn.Identity(), "none"
        return True

    def make_identity(self) -> None:
        """Start as the exact identity, a(x) = 1 for every x: fc2 = 0 and scale 2 (sigmoid(0) = 1/2)."""
        with torch.no_grad():
            self.fc2.weight.zero_()
            if self.fc2.bias is not None:
                self.fc2.bias.zero_()
        self.scale = 2.0

    def extra_repr(self) -> str:
        return f"norm={self.norm_kind!r}, scale={self.scale:g}"


class ChildAdapter(nn.Module):
    """Everything a KernelDNA child owns: F, S, its gate, its bias, and the conv's geometry, of any rank (a
    Conv1d, Conv2d or Conv3d child: S has the kernel's shape, k, kxk or kxkxk).

    It holds no kernel of its own; ``parent`` names the module whose weight it reuses. Two ways to run it,
    one computation (kdna_fx.functional.child_conv):

    - in a rewritten graph (passes.rewriting) its tensors are read by get_attr nodes and the parent kernel is
      a get_attr of the parent's weight; the module itself is never called;
    - put in place of the conv by module swap (passes.swapping) it is called like the conv it replaced,
      ``child(x)``, and reads its parent's kernel through ``bind``: a reference to the parent *module*, kept
      out of the module tree, so the kernel stays one Parameter registered once (state dict, optimisers,
      safetensors, torch.export) and follows ``.to()``, ``load_state_dict`` and ``functional_call``.
    """

    def __init__(
        self,
        *,
        parent: str,
        out_channels: int,
        in_channels: int,
        kernel_size: KernelSize,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        bias: Tensor | None = None,
        filter_scale: bool = True,
        spatial_scale: bool = True,
        rank: int | str = 0,
        gate: Gate | None = None,
        weight: Tensor | None = None,
    ):
        super().__init__()
        self.parent = parent
        self.out_channels, self.in_channels, self.kernel_size = out_channels, in_channels, tuple(kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.padding_mode = groups, padding_mode
        # F and S start at zero: the child starts as an exact copy of its parent kernel.
        self.filter_scale = nn.Parameter(torch.zeros(out_channels)) if filter_scale else None
        self.spatial_scale = (nn.Parameter(torch.zeros(self.kernel_size))
                              if spatial_scale and has_spatial_scale(self.kernel_size) else None)
        # Relaxed child: a rank-r kernel residual B A. B starts at zero (no change to the kernel), A random so
        # that B gets a gradient (LoRA's initialisation); init="trained" sets both from an SVD instead.
        fan = in_channels // groups * math.prod(self.kernel_size)
        rank = effective_rank(rank, out_channels, in_channels, self.kernel_size, groups)
        self.lowrank_b = nn.Parameter(torch.zeros(out_channels, rank)) if rank else None
        self.lowrank_a = nn.Parameter(torch.randn(rank, fan) / fan ** 0.5) if rank else None
        self.gate = gate
        self.bias = _as_parameter(bias)
        # Only where the child holds the shared kernel itself: adapter-only mode (share=False), where it is
        # its own parent, and the first member of a centroid family. Otherwise there is no ``weight`` at all:
        # reading it raises (see __getattr__).
        if weight is not None:
            self.weight = _as_parameter(weight)
        # kdna_fx.fold: P(1+F)(1+S)(+BA) precomputed; F, S, B, A are then gone.
        self.register_parameter("folded_weight", None)
        self.__dict__["_parent_module"] = None  # not a submodule: see bind()

    def bind(self, parent: nn.Module | None) -> "ChildAdapter":
        """Read the shared kernel from ``parent.weight`` when called as ``child(x)`` (module swap). The
        reference lives outside the module tree (no second registration of the parent); deepcopy, pickle and
        ``.to()`` keep it pointing at the same parent as the rest of the model."""
        self.__dict__["_parent_module"] = parent
        return self

    @property
    def held_weight(self) -> nn.Parameter | None:
        """The shared kernel when this child holds it (adapter-only mode, a centroid's first member), else None."""
        return self._parameters.get("weight")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name != "weight":
                raise
        # Code written for nn.Conv2d (BatchNorm fusion, weight surgery) would read a kernel that is not what
        # this child computes: its gate scales each sample's input. Refuse, naming the fixes.
        raise ChildWeightError(f"a KernelDNA child (ChildAdapter, reusing the kernel of {self.parent!r}) has no weight of "
                               f"its own, and no single kernel computes it: its gate scales every sample's input. Code "
                               f"that reads conv.weight (BatchNorm fusion such as Ultralytics' fuse(), weight surgery) "
                               f"would drop the gate. Fuse BatchNorms before kdna_fx.transform, or skip the fusion; "
                               f"kdna_fx.fold(model) precomputes each child's static kernel (child.folded_weight) for "
                               f"inference.")

    @property
    def parent_kernel(self) -> Tensor:
        """The kernel this child reuses: its own (folded, or held) or its bound parent's."""
        if self.folded_weight is not None:
            return self.folded_weight
        if self.held_weight is not None:
            return self.held_weight
        parent = self.__dict__["_parent_module"]
        if parent is None:
            raise KDNAError(f"this ChildAdapter (a child of {self.parent!r}) is not bound to its parent module: "
                            f"it runs inside a rewritten graph, which passes the kernel in (child(x, kernel))")
        return parent.weight

    def conv_kwargs(self) -> dict[str, Any]:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups, padding_mode=self.padding_mode)

    def forward(self, x: Tensor, parent_weight: Tensor | None = None) -> Tensor:
        if parent_weight is None:
            parent_weight = self.parent_kernel
        return KF.child_conv(x, parent_weight, filter_scale=self.filter_scale, spatial_scale=self.spatial_scale,
                               lowrank_b=self.lowrank_b, lowrank_a=self.lowrank_a,
                               gate_values=self.gate(x) if self.gate is not None else None, bias=self.bias,
                               **self.conv_kwargs())

    def extra_repr(self) -> str:
        return (f"parent={self.parent!r}, {self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"padding_mode={self.padding_mode!r}")


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every adapter parameter of ``model``: each child's F and S and every parameter of
    its gate, found by type. A child's bias and a self-adapted child's own kernel belong to the conv, not to
    the adapter, and are not listed."""
    for path, module in model.named_modules():
        if not isinstance(module, ChildAdapter):
            continue
        prefix = f"{path}." if path else ""
        for name in ADAPTER_TENSORS:
            p = getattr(module, name)
            if p is not None:
                yield prefix + name, p
        if module.gate is not None:
            for name, p in module.gate.named_parameters():
                yield f"{prefix}gate.{name}", p


def _as_parameter(t: Tensor | None) -> nn.Parameter | None:
    # The conv's own Parameter object moves over as it is, so nothing is copied and optimisers see no change.
    if t is None or isinstance(t, nn.Parameter):
        return t
    return nn.Parameter(t.detach().clone())
