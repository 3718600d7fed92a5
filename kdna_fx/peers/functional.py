"""The per-sample-kernel math of the dynamic-convolution peers (CondConv, DY-Conv, ODConv, KernelWarehouse) as
pure functions.

These are what KernelDNA is compared with: each sample gets its own kernel, built from K expert kernels
[K, C_out, C_in/g, k, k] and the sample's attentions, and the batch runs as one grouped convolution with
groups = B * g, as the original implementations do. ``dynamic_conv2d`` is the one place that kernel is
built and applied; the modules in kdna_fx.peers only compute the attentions.

Attention shapes: kernel [B, K], channel [B, C_in], filter [B, C_out], spatial [B, k*k].

KernelWarehouse builds its kernels differently: a layer's kernel is cut into m cells of [c_out, c_in] (one
kernel position each), and every cell is a mixture of the n cells of a warehouse [n, c_out, c_in] shared by
several layers (``warehouse_attention``, ``warehouse_kernels``, ``warehouse_conv2d``); the per-sample kernels
run through the same ``per_sample_conv2d``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .. import functional as KF
from ..functional import IntOrPair, PaddingMode


def dynamic_kernels(experts: Tensor, kernel_attention: Tensor | None = None, *,
                    channel_attention: Tensor | None = None, filter_attention: Tensor | None = None,
                    spatial_attention: Tensor | None = None, groups: int = 1) -> Tensor:
    """Each sample's kernel [B, C_out, C_in/g, k, k]: sum_k a[b, k] W_k, times the optional ODConv attentions.

    ``kernel_attention`` None means K = 1 and no mixing. The mixture is one matrix product, so a flop counter
    sees the cost of building the kernels (B * K * kernel size MACs); the attention products are elementwise.
    At least one attention must be given (else there is no batch to build kernels for).
    """
    k, out_ch, per_group, kh, kw = experts.shape
    if kernel_attention is None:
        weights = experts[:1]  # [1, ...]: broadcast over the batch by the attentions below
    else:
        mixed = kernel_attention @ rearrange(experts, "k o i kh kw -> k (o i kh kw)")
        weights = rearrange(mixed, "b (o i kh kw) -> b o i kh kw", o=out_ch, i=per_group, kh=kh)
    if channel_attention is not None:
        # Input channel c belongs to group c // (C_in/g) and is slot c % (C_in/g) of that group's filters.
        grouped = rearrange(weights, "b (g o) i kh kw -> b g o i kh kw", g=groups)
        scale = rearrange(channel_attention, "b (g i) -> b g 1 i 1 1", g=groups)
        weights = rearrange(grouped * scale, "b g o i kh kw -> b (g o) i kh kw")
    if filter_attention is not None:
        weights = weights * rearrange(filter_attention, "b o -> b o 1 1 1")
    if spatial_attention is not None:
        weights = weights * rearrange(spatial_attention, "b (kh kw) -> b 1 1 kh kw", kh=kh)
    return weights


# The form per_sample_conv2d takes: "grouped" (one grouped convolution, as the original implementations) or
# "matmul" (im2col and a batched matrix product). ONNX's Conv takes its group count as a fixed attribute, so a
# file with a dynamic batch cannot hold the grouped form; kdna_fx.export captures the matmul form for it. A
# plain module global rather than a ContextVar: torch.compile guards on it without a graph break.
_FORM = "grouped"


@contextmanager
def per_sample_form(form: str) -> Iterator[None]:
    """Run ``per_sample_conv2d`` in ``form`` ("grouped" or "matmul") inside the block; both compute the same."""
    global _FORM
    if form not in ("grouped", "matmul"):
        raise ValueError(f"per-sample convolution form must be 'grouped' or 'matmul', got {form!r}")
    previous, _FORM = _FORM, form
    try:
        yield
    finally:
        _FORM = previous


def per_sample_conv2d(x: Tensor, weights: Tensor, bias: Tensor | None = None, stride: IntOrPair = 1,
                      padding: IntOrPair | str = 0, dilation: IntOrPair = 1, groups: int = 1,
                      padding_mode: PaddingMode = "zeros") -> Tensor:
    """Convolve sample b of ``x`` [B, C_in, H, W] with ``weights[b]`` (+ ``bias[b]``, bias [B, C_out]).

    The grouped-convolution trick: the batch becomes channel groups of one sample, x -> [1, B*C_in, H, W],
    kernels -> [B*C_out, C_in/g, k, k], groups = B*g. One convolution, but no kernel is shared across the
    batch, which is what makes these peers slow next to a batch-shared convolution. Inside
    ``per_sample_form("matmul")`` the same result comes from im2col and a batched matrix product.
    """
    if _FORM == "matmul":
        return _per_sample_matmul(x, weights, bias, stride, padding, dilation, groups, padding_mode)
    b = x.shape[0]
    y = KF.conv(rearrange(x, "b c h w -> 1 (b c) h w"), rearrange(weights, "b o i kh kw -> (b o) i kh kw"),
                  None if bias is None else rearrange(bias, "b o -> (b o)"),
                  stride, padding, dilation, groups * b, padding_mode)
    return rearrange(y, "1 (b o) h w -> b o h w", b=b)


def _per_sample_matmul(x: Tensor, weights: Tensor, bias: Tensor | None, stride: IntOrPair, padding: IntOrPair | str,
                       dilation: IntOrPair, groups: int, padding_mode: PaddingMode) -> Tensor:
    _, out_ch, _, kh, kw = weights.shape
    # Padding made explicit first, so "same"/"valid" and every padding mode take one path.
    x = F.pad(x, KF.explicit_padding((kh, kw), padding, dilation),
              mode="constant" if padding_mode == "zeros" else padding_mode)
    (sh, sw), (dh, dw) = KF.ntuple(stride), KF.ntuple(dilation)
    out_h = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    columns = rearrange(F.unfold(x, (kh, kw), dilation=(dh, dw), stride=(sh, sw)), "b (g i) l -> b g i l", g=groups)
    y = rearrange(weights, "b (g o) i kh kw -> b g o (i kh kw)", g=groups) @ columns
    y = rearrange(y, "b g o (h w) -> b (g o) h w", h=out_h, w=out_w)
    return y if bias is None else y + rearrange(bias, "b o -> b o 1 1")


def dynamic_conv2d(x: Tensor, experts: Tensor, kernel_attention: Tensor | None = None, bias: Tensor | None = None,
                   *, channel_attention: Tensor | None = None, filter_attention: Tensor | None = None,
                   spatial_attention: Tensor | None = None, stride: IntOrPair = 1, padding: IntOrPair | str = 0,
                   dilation: IntOrPair = 1, groups: int = 1, padding_mode: PaddingMode = "zeros") -> Tensor:
    """One dynamic convolution: per-sample kernels from ``dynamic_kernels``, applied by ``per_sample_conv2d``.

    ``bias`` [K, C_out] holds one bias per expert, mixed by the kernel attention like the kernels (CondConv,
    DY-Conv); it is not scaled by the filter attention.
    """
    weights = dynamic_kernels(experts, kernel_attention, channel_attention=channel_attention,
                              filter_attention=filter_attention, spatial_attention=spatial_attention, groups=groups)
    batch = x.shape[0]
    weights = weights.expand(batch, *weights.shape[1:])
    if bias is not None:
        bias = bias[:1].expand(batch, -1) if kernel_attention is None else kernel_attention @ bias
    return per_sample_conv2d(x, weights, bias, stride, padding, dilation, groups, padding_mode)


def warehouse_attention(logits: Tensor, init_attention: Tensor, temperature: Tensor | float,
                        eps: float = 1e-3) -> Tensor:
    """KernelWarehouse's contrasting-driven attention [B, m, n] from the head's ``logits`` [B, m*(n+1)].

    Each of the m cells of the layer has n+1 logits z: one per warehouse cell and a last one for a zero cell.
    alpha = (1 - tau) * z / (sum |z| + eps) + tau * gamma, with gamma = ``init_attention`` [m, n+1] (one-hot
    rows) and tau = ``temperature`` (1 -> 0 early in training). Dividing by the L1 norm (not a softmax) lets
    attentions be negative and contrast with each other; the zero cell's column is dropped at the end, so
    mass put there mixes nothing in.
    """
    z = rearrange(logits, "b (m c) -> b m c", c=init_attention.shape[-1])
    alpha = (1.0 - temperature) * (z / (z.abs().sum(-1, keepdim=True) + eps)) + temperature * init_attention
    return alpha[..., :-1]


def warehouse_kernels(attention: Tensor, cells: Tensor, out_channels: int, kernel_size: tuple[int, int]) -> Tensor:
    """Each sample's kernel [B, C_out, C_in/g, kh, kw] from ``attention`` [B, m, n] over ``cells`` [n, co, ci].

    Cell j of the kernel, j = (position, output block, input block) in that order (position = kh*kw row-major),
    is sum_c attention[b, j, c] * cells[c]. The mixture is one matrix product, B*m*n*co*ci MACs to a counter.
    """
    _, co, ci = cells.shape
    kh, kw = kernel_size
    mixed = attention @ rearrange(cells, "n co ci -> n (co ci)")
    return rearrange(mixed, "b (kh kw ob ib) (co ci) -> b (ob co) (ib ci) kh kw", kh=kh, kw=kw, ob=out_channels // co,
                     co=co)


def kernel_cells(kernel: Tensor, cell_out: int, cell_in: int) -> Tensor:
    """The m cells [m, cell_out, cell_in] of ``kernel`` [C_out, C_in/g, kh, kw], in warehouse_kernels' order (its
    inverse: ``warehouse_kernels`` with one-hot attentions over these cells rebuilds the kernel)."""
    return rearrange(kernel, "(ob co) (ib ci) kh kw -> (kh kw ob ib) co ci", co=cell_out, ci=cell_in)


def warehouse_conv2d(x: Tensor, cells: Tensor, attention: Tensor, out_channels: int, kernel_size: tuple[int, int],
                     bias: Tensor | None = None, stride: IntOrPair = 1, padding: IntOrPair | str = 0,
                     dilation: IntOrPair = 1, groups: int = 1, padding_mode: PaddingMode = "zeros") -> Tensor:
    """One KernelWarehouse convolution: kernels from ``warehouse_kernels``, applied by ``per_sample_conv2d``.
    ``bias`` [C_out] is static (not mixed), as in the original."""
    weights = warehouse_kernels(attention, cells, out_channels, kernel_size)
    bias = None if bias is None else bias.expand(x.shape[0], -1)
    return per_sample_conv2d(x, weights, bias, stride, padding, dilation, groups, padding_mode)


def require_batch_statistics(h: Tensor, method: str = "ODConv") -> Tensor:
    """``h`` itself, or a GateBatchSizeError when a peer's BatchNorm (ODConv, KernelWarehouse) would train on one
    sample."""
    if h.shape[0] == 1:
        from ..errors import GateBatchSizeError

        raise GateBatchSizeError(
            f"{method}'s attention has a BatchNorm (as in the paper), which cannot train on a batch of 1 sample: "
            f"train with batch size >= 2, or run the model in eval mode.")
    return h


# torch.fx leaves, as in kdna_fx.functional: tracing a converted model records one node per call.
for _name in ("dynamic_kernels", "per_sample_conv2d", "dynamic_conv2d", "warehouse_attention", "warehouse_kernels",
              "kernel_cells", "warehouse_conv2d", "require_batch_statistics"):
    torch.fx.wrap(_name)
