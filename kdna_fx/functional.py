"""The KernelDNA adapter math as pure functions on tensors.

Everything here is differentiable, free of module state and usable under torch.func (functional_call,
vmap, grad) and torch.compile. Shape work is written with einops so the broadcast is visible in the
pattern rather than hidden in a chain of ``[:, None]``.

Notation (../shared/KERNELDNA.md): parent kernel P [C_out, C_in/g, *K], per-filter scale F [C_out],
per-position scale S [*K], gate values a [B, C_in]. K is the kernel's spatial shape, (k,), (kh, kw) or
(kd, kh, kw): one function serves 1-D, 2-D and 3-D convolutions, its einops patterns built from the rank.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor

# einops finds its backend by the tensor's type and caches it per type in a dict. Were a type's first use
# inside torch.compile, dynamo would trace the cache being filled and guard on its size, so the first compiled
# model of a process recompiled once on its second call (an nn.Parameter rearranged in the forward, as the
# peers' experts are). Filled here, at import, for the two types a model's forward hands to einops.
for _tensor in (torch.zeros(1), torch.nn.Parameter(torch.zeros(1))):
    rearrange(_tensor, "a -> a")
del _tensor

GateNorm = Literal["batch", "layer", "none"]
"""The norm inside a gate: BatchNorm over the batch (the reference), LayerNorm per sample, or none."""
PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
IntOrPair = int | Sequence[int]


def ntuple(v: Any, n: int = 2) -> Any:
    """(v,) * n for an int, a tuple of ints for a sequence; anything else (a padding string) as it is."""
    if isinstance(v, int):
        return (v,) * n
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else v


def _axes(n: int) -> str:
    """Names of ``n`` spatial axes for an einops pattern: "k0 k1" for a 2-D kernel."""
    return " ".join(f"k{i}" for i in range(n))


def modulate(parent: Tensor, filter_scale: Tensor | None = None, spatial_scale: Tensor | None = None,
             lowrank_b: Tensor | None = None, lowrank_a: Tensor | None = None) -> Tensor:
    """Static modulation W = P * (1 + F) * (1 + S) (+ B A); a missing scale counts as zero.

    B [C_out, r] and A [r, C_in/g * prod(K)] form the optional low-rank kernel residual of a relaxed child,
    added on the kernel viewed as a [C_out, C_in/g * prod(K)] matrix.
    """
    axes = _axes(parent.dim() - 2)
    ones = " ".join("1" * (parent.dim() - 1))
    # The two small scales are combined first ([C_out, 1, *K]), so the kernel is read and written once: at
    # batch 1 a late-stage child (512x512x3x3 on 7x7) takes longer to modulate its kernel than to convolve.
    scale = None
    if filter_scale is not None:
        scale = rearrange(1 + filter_scale, f"o -> o {ones}")
    if spatial_scale is not None:
        spatial = rearrange(1 + spatial_scale, f"{axes} -> 1 1 {axes}")
        scale = spatial if scale is None else scale * spatial
    weight = parent if scale is None else parent * scale
    if lowrank_b is not None and lowrank_a is not None:
        sizes = dict(zip(["i", *axes.split()], parent.shape[1:]))
        weight = weight + rearrange(lowrank_b @ lowrank_a, f"o (i {axes}) -> o i {axes}", **sizes)
    return weight


def gate(x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor, fc2_bias: Tensor | None,
         norm: Callable[[Tensor], Tensor] | None = None, scale: float | Tensor = 1.0, fc1_bias: Tensor | None = None) -> Tensor:
    """Dynamic routing a(x) = scale * sigmoid(fc2(relu(norm(fc1(mean(x)))))), shape [B, C_in]; the mean is
    over every spatial axis of ``x`` [B, C_in, ...].

    ``fc1_bias`` is None in a trainable gate; a folded gate (kdna_fx.fold) has its eval-mode BatchNorm
    folded into fc1's weight and this bias, and no norm.

    ``scale`` is 1 in the reference. With scale 2 and fc2 = 0 the gate is exactly the identity (a = 1) while
    its gradient stays that of a sigmoid at 0: how a converted trained model starts (init="trained").

    ``norm`` is applied to the reduced vector [B, C_in / r]: any callable, in practice the gate's own norm
    module (nn.BatchNorm1d, nn.LayerNorm, or a SyncBatchNorm converted from them), so module conversions
    and torch.func.functional_call reach it like any other layer. None skips the norm.
    """
    m = reduce(x, "b c ... -> b c", "mean")
    if not torch.is_autocast_enabled(x.device.type):
        return _gate_mlp(m, fc1_weight, fc2_weight, fc2_bias, norm, scale, fc1_bias)
    # Under autocast the two tiny linears run in the weights' dtype (fp32), not in bf16: on a CPU without AMX a
    # bf16 linear of one sample costs oneDNN 0.1-0.3 ms, and at batch 1 the 9 gates of an unfolded ResNet-18 spent
    # about 6 % of its bf16 forward there (docs/speed.md). Values are cast back, so the scaling stays a pass in the
    # activations' dtype.
    with torch.autocast(x.device.type, enabled=False):
        a = _gate_mlp(m.to(torch.promote_types(m.dtype, fc1_weight.dtype)), fc1_weight, fc2_weight, fc2_bias, norm,
                      scale, fc1_bias)
    return a.to(x.dtype)


def _gate_mlp(m: Tensor, fc1_weight: Tensor, fc2_weight: Tensor, fc2_bias: Tensor | None,
              norm: Callable[[Tensor], Tensor] | None, scale: float | Tensor, fc1_bias: Tensor | None) -> Tensor:
    h = F.linear(m, fc1_weight, fc1_bias)
    if norm is not None:
        h = norm(h)
    a = torch.sigmoid(F.linear(F.relu(h), fc2_weight, fc2_bias))
    # A tensor scale (the Gate's buffer) always multiplies: testing its value would break a compiled graph.
    return a if isinstance(scale, float) and scale == 1.0 else a * scale


def require_batch_statistics(x: Tensor) -> Tensor:
    """``x`` itself, or a GateBatchSizeError when its batch has one sample (batch statistics are undefined).

    A torch.fx leaf, so models that call it stay traceable in train mode: the check runs when the traced
    graph runs, not while it is traced.
    """
    if x.shape[0] == 1:
        from .errors import GateBatchSizeError

        raise GateBatchSizeError(
            "a KernelDNA gate with a BatchNorm cannot train on a batch of 1 sample (the batch statistics of "
            "one vector are undefined). Train with batch size >= 2, or use a gate norm that works at any batch "
            "size: KDNAConfig(adapter=AdapterConfig(gate_norm='layer')) (or 'none'), or gate_norm='layer' for "
            "a zoo model.")
    return x


def scale_channels(x: Tensor, a: Tensor) -> Tensor:
    """Scale input channel c of sample b by a[b, c]: the gate acts on the activations, not the kernel."""
    return x * rearrange(a, "b c -> b c" + " 1" * (x.dim() - 2))


def explicit_padding(kernel_size: IntOrPair, padding: IntOrPair | str, dilation: IntOrPair,
                     n: int = 2) -> tuple[int, ...]:
    """Padding as F.pad wants it for an input with ``n`` spatial dims: last dim first, (left, right) each."""
    kernel, dilation = ntuple(kernel_size, n), ntuple(dilation, n)
    if padding == "valid":
        return (0,) * 2 * n
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        sides = [(t // 2, t - t // 2) for t in totals]
    else:
        sides = [(p, p) for p in ntuple(padding, n)]  # type: ignore[arg-type]
    return tuple(v for side in reversed(sides) for v in side)


_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair | str = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    padding_mode: PaddingMode = "zeros",
) -> Tensor:
    """F.conv1d, F.conv2d or F.conv3d by the kernel's rank, honouring the conv modules' padding modes (reflect,
    replicate, circular) too."""
    n = weight.dim() - 2
    if padding_mode != "zeros":
        x = F.pad(x, explicit_padding(weight.shape[2:], padding, dilation, n), mode=padding_mode)
        padding = 0
    return _CONVS[n](x, weight, bias, stride, padding, dilation, groups)


def per_sample_kernel(weight: Tensor, a: Tensor, groups: int = 1) -> Tensor:
    """The kernel that gating one sample's input by ``a`` [C_in] is equivalent to.

    Input channel c belongs to group c // (C_in/g) and is slot c % (C_in/g) of that group's filters.
    This is the naive formulation (one kernel per sample) that KernelDNA avoids; it exists as the
    reference for the equivalence tests.
    """
    grouped = rearrange(weight, "(g o) j ... -> g o j ...", g=groups)
    scale = rearrange(a, "(g j) -> g 1 j" + " 1" * (weight.dim() - 2), g=groups)
    return rearrange(grouped * scale, "g o j ... -> (g o) j ...")


def child_conv(
    x: Tensor,
    parent: Tensor,
    *,
    filter_scale: Tensor | None = None,
    spatial_scale: Tensor | None = None,
    lowrank_b: Tensor | None = None,
    lowrank_a: Tensor | None = None,
    gate_values: Tensor | None = None,
    bias: Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair | str = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    padding_mode: PaddingMode = "zeros",
) -> Tensor:
    """One KernelDNA child: conv(x * a(x), P(1+F)(1+S) (+ B A)) + bias, a single batch-shared convolution of
    any rank (1-D, 2-D, 3-D: the kernel's)."""
    if gate_values is not None:
        x = scale_channels(x, gate_values)
    weight = modulate(parent, filter_scale, spatial_scale, lowrank_b, lowrank_a)
    return conv(x, weight, bias, stride, padding, dilation, groups, padding_mode)


# torch.fx leaves: tracing code that calls these (a transformed model traced again, a model-zoo network)
# records one call_function node each instead of tracing into einops, which cannot take fx proxies.
for _name in ("modulate", "gate", "require_batch_statistics", "scale_channels", "conv", "child_conv",
              "per_sample_kernel"):
    torch.fx.wrap(_name)
