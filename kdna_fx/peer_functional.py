"""The per-sample-kernel math of the dynamic-convolution peers (CondConv, DY-Conv, ODConv) as pure functions.

These are what KernelDNA is compared with: each sample gets its own kernel, built from K expert kernels
[K, C_out, C_in/g, k, k] and the sample's attentions, and the batch runs as one grouped convolution with
groups = B * g, as the original implementations do. ``dynamic_conv2d`` is the one place that kernel is
built and applied; the modules in kdna_fx.peers only compute the attentions.

Attention shapes: kernel [B, K], channel [B, C_in], filter [B, C_out], spatial [B, k*k].
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from . import functional as KF
from .functional import IntOrPair, PaddingMode


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


def per_sample_conv2d(x: Tensor, weights: Tensor, bias: Tensor | None = None, stride: IntOrPair = 1,
                      padding: IntOrPair | str = 0, dilation: IntOrPair = 1, groups: int = 1,
                      padding_mode: PaddingMode = "zeros") -> Tensor:
    """Convolve sample b of ``x`` [B, C_in, H, W] with ``weights[b]`` (+ ``bias[b]``, bias [B, C_out]).

    The grouped-convolution trick: the batch becomes channel groups of one sample, x -> [1, B*C_in, H, W],
    kernels -> [B*C_out, C_in/g, k, k], groups = B*g. One convolution, but no kernel is shared across the
    batch, which is what makes these peers slow next to a batch-shared convolution.
    """
    b = x.shape[0]
    y = KF.conv2d(rearrange(x, "b c h w -> 1 (b c) h w"), rearrange(weights, "b o i kh kw -> (b o) i kh kw"),
                  None if bias is None else rearrange(bias, "b o -> (b o)"),
                  stride, padding, dilation, groups * b, padding_mode)
    return rearrange(y, "1 (b o) h w -> b o h w", b=b)


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


def require_batch_statistics(h: Tensor) -> Tensor:
    """``h`` itself, or a GateBatchSizeError when a peer's BatchNorm (ODConv) would train on one sample."""
    if h.shape[0] == 1:
        from .errors import GateBatchSizeError

        raise GateBatchSizeError(
            "ODConv's attention has a BatchNorm (as in the paper), which cannot train on a batch of 1 sample: "
            "train with batch size >= 2, or run the model in eval mode.")
    return h


# torch.fx leaves, as in kdna_fx.functional: tracing a converted model records one node per call.
for _name in ("dynamic_kernels", "per_sample_conv2d", "dynamic_conv2d", "require_batch_statistics"):
    torch.fx.wrap(_name)
