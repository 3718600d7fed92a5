"""Thin nn.Module holders for adapter parameters. All the math lives in kdna_fx.functional."""
from __future__ import annotations

import math
from typing import Any, ClassVar, Iterator, get_args

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from . import functional as KF
from .errors import ChildWeightError, ConfigError, KDNAError, ParentKernelError

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
        # A buffer, not a float: it defines the function (2 for init="trained"), so the state dict must hold it.
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.built_scale = float(scale)
        self.norm_kind = check_gate_norm(norm)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.norm: nn.Module = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}.get(norm, nn.Identity)(hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        norm = None if self.norm_kind == "none" else self.norm
        if self.training and self.norm_kind == "batch":
            if self.frozen and self.norm.running_mean is not None:
                norm = self._frozen_norm
            else:
                x = KF.require_batch_statistics(x)
        return KF.gate(x, self.fc1.weight, self.fc2.weight, self.fc2.bias, norm, self.scale, self.fc1.bias)

    @property
    def frozen(self) -> bool:
        """No parameter of the gate trains (a frozen conv's child, timm's ``freeze``): its BatchNorm then
        normalises with its running statistics and never updates them, as a frozen BatchNorm2d would."""
        return not any(p.requires_grad for p in self.parameters())

    def _frozen_norm(self, h: Tensor) -> Tensor:
        bn = self.norm
        return F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fresh layers and the scale it was built with (the config's gate_scale), as ``__init__`` makes them."""
        for layer in (self.fc1, self.norm, self.fc2):
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        self.scale.fill_(self.built_scale)

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
            self.scale.fill_(2.0)

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        # State dicts saved before the scale was a buffer lack it: they keep the scale the gate was built with
        # (the config's gate_scale, 2 for init="trained"), which is what the old model computed.
        state_dict.setdefault(f"{prefix}scale", self.scale.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"norm={self.norm_kind!r}"


class ChildAdapter(nn.Module):
    """Everything a KernelDNA child owns: F, S, its gate, its bias, and the conv's geometry, of any rank (a
    Conv1d, Conv2d or Conv3d child: S has the kernel's shape, k, kxk or kxkxk).

    It holds no kernel of its own; ``parent`` names the module whose weight it reuses. Put in place of the
    conv (passes.swapping), it is called like the conv it replaced, ``child(x)``, computes
    kdna_fx.functional.child_conv, and reads its parent's kernel through ``bind``: a reference to the parent
    *module*, kept out of the module tree, so the kernel stays one Parameter registered once (state dict,
    optimisers, safetensors, torch.export) and follows ``.to()``, ``load_state_dict`` and ``functional_call``.
    Traced (passes.lower), its forward becomes the design card's nodes: a get_attr of the parent's weight and
    one child_conv call.
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
        """Read the shared kernel from ``parent.weight`` when called as ``child(x)``. The
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
                            f"pass the kernel in (child(x, kernel))")
        kernel = parent.weight
        if isinstance(kernel, nn.Parameter):
            return kernel
        if isinstance(kernel, fx.Proxy) and not getattr(kernel.tracer, "reads_children", False):
            # A symbolic trace would read the parent's kernel by its path, and graph passes run on such traces
            # (torch.fx fuse, torch.ao prepare_fx / prepare_qat_fx) fuse the parent's BatchNorm into that kernel
            # or move it: every child would then silently compute with another kernel, or with none.
            raise ParentKernelError(
                f"torch.fx is tracing a KernelDNA child of {self.parent!r}, which reuses its parent's kernel; a "
                f"graph pass that fuses BatchNorms into convs (torch.fx.experimental.optimization.fuse, "
                f"torch.ao prepare_fx / prepare_qat_fx) would rescale or drop the kernel the children share. Fold "
                f"first (kdna_fx.fold(model), each child then holds its own kernel), or fuse and prepare before "
                f"kdna_fx.transform; for the graph itself, kdna_fx.passes.lower(model) gives it, checked.")
        orig, mask = getattr(parent, "weight_orig", None), getattr(parent, "weight_mask", None)
        pruned = isinstance(orig, Tensor) and isinstance(mask, Tensor)
        if pruned and not parametrize.is_parametrized(parent, "weight"):
            # torch.nn.utils.prune: parent.weight is what the parent's last forward pre-hook computed, stale
            # for a child that runs first and freed after a backward; the mask applied here is the same.
            return orig * mask
        # A parametrization recomputes the kernel at each access; functional_call substitutes a tensor: follow both.
        return kernel

    def freeze_adapters(self) -> None:
        """Stop F, S, the low-rank residual and the gate from training (the child of a frozen conv)."""
        for name in ADAPTER_TENSORS:
            if getattr(self, name) is not None:
                getattr(self, name).requires_grad_(False)
        if self.gate is not None:
            self.gate.requires_grad_(False)

    @torch.no_grad()
    def reset_adapters(self) -> None:
        """F, S and B back to zero, A and the gate freshly drawn, as ``__init__`` builds them: after
        ``to_empty`` (a model transformed on the meta device) they hold uninitialised memory."""
        for t in (self.filter_scale, self.spatial_scale, self.lowrank_b):
            if t is not None:
                t.zero_()
        if self.lowrank_a is not None:
            self.lowrank_a.normal_().div_(self.lowrank_a.shape[1] ** 0.5)
        if self.gate is not None:
            self.gate.reset_parameters()

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
