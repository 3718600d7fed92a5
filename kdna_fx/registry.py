"""Modules that tracing keeps opaque (timm-style), each with a one-line reason.

An opaque module stays one ``call_module`` node: it runs exactly as before, and convolutions inside
it are never shared. Add your own with ``register_not_traced`` or ``KDNAConfig(leaf_modules=...)``.
"""
from __future__ import annotations

from torch import nn
from torchvision.ops import StochasticDepth

from .errors import ConfigError, KDNATypeError

NOT_TRACED: dict[type, str] = {
    nn.MultiheadAttention: "its forward branches on input shapes (batched or not), which symbolic tracing "
                           "cannot follow; it holds no convolution",
    StochasticDepth: "it reads self.training when called; traced into, the graph would keep the train/eval mode "
                     "it was traced in forever; it holds no convolution",
}


def register_not_traced(cls: type, reason: str) -> type:
    """Keep ``cls`` opaque during tracing. Usable as ``register_not_traced(MyBlock, "why")``."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise KDNATypeError(f"register_not_traced takes an nn.Module subclass, got {cls!r}")
    if not reason:
        raise ConfigError("give a one-line reason so the registry stays readable")
    NOT_TRACED[cls] = reason
    return cls
