"""Configuration objects for transform().

Which adapter a convolution gets is decided with this precedence, highest first (as in
torch.ao.quantization's QConfigMapping):

1. ``by_name``: exact module name (``"layer3.1.conv2"``; for a functional ``F.conv2d`` site, the
   qualified name of its weight parameter);
2. ``by_name_regex``: the first pattern, in order, that ``re.search``-matches the name;
3. ``by_type``: the conv's module type (``nn.Conv2d``, ``nn.Conv3d``), or ``F.conv2d`` (``F.conv1d``,
   ``F.conv3d``) for functional sites;
4. ``adapter``: the global default.

At every level ``None`` means "skip this convolution": it is neither parent nor child.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn.functional as F

from .adapters import check_gate_norm
from .errors import ConfigError
from .functional import GateNorm

_FUNCTION_NAMES: dict[Any, str] = {f: f"torch.nn.functional.{f.__name__}" for f in (F.conv1d, F.conv2d, F.conv3d)}


@dataclass(frozen=True)
class AdapterConfig:
    """What each child gets. Defaults follow the KernelDNA reference (SE gate with r = 4, F and S)."""

    gate: bool = True
    """Input-dependent gate a(x). False makes the child purely static (W = P(1+F)(1+S))."""
    reduction: int = 4
    """Gate width is C_in // reduction (at least ``gate_min_hidden``, at least 1)."""
    gate_norm: GateNorm | str = "auto"
    """'batch' (the reference's BatchNorm; needs batch >= 2 in training), 'layer' (any batch size), 'none', or
    'auto' (default): 'batch' when the model itself holds a BatchNorm (it cannot train at batch 1 either),
    else 'layer', so a model built on FrozenBatchNorm2d, GroupNorm or LayerNorm (detectors, segmentation
    nets trained at batch 1-2) gets gates that train at any batch size. transform resolves it; the
    record's config holds the resolved choice."""
    gate_min_hidden: int = 1
    filter_scale: bool = True
    """Per-filter scale F [C_out]. Note: a BatchNorm right after the child cancels it in training."""
    spatial_scale: bool = True
    """Per-position scale S [k, k]; never created for 1x1 kernels."""
    rank: int | str = 0
    """Relaxed child (beyond the paper): a rank-r kernel residual B A added to P(1+F)(1+S), B [C_out, r],
    A [r, C_in/g*k*k]; 0 = none. The knob between sharing and fidelity; folded away for inference.
    ``"full"`` asks for each conv's full rank, min(C_out, C_in/g*k*k); a larger number is clamped to it per
    conv (one global rank serves convs of many sizes)."""
    gate_scale: float = 1.0
    """a(x) = gate_scale * sigmoid(...): 1 in the reference; transform(init="trained") sets 2, so that a
    fresh gate is exactly the identity."""

    def __post_init__(self) -> None:
        if self.gate_norm != "auto":
            check_gate_norm(self.gate_norm)
        if self.rank != "full" and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0):
            raise ConfigError(f"AdapterConfig.rank must be an integer >= 0 or 'full' (each conv's full rank), "
                              f"got {self.rank!r}")
        if not (isinstance(self.gate_scale, (int, float)) and self.gate_scale > 0):
            raise ConfigError(f"AdapterConfig.gate_scale must be a positive number, got {self.gate_scale!r}")
        for name in ("reduction", "gate_min_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"AdapterConfig.{name} must be an integer >= 1, got {value!r}")


@dataclass
class KDNAConfig:
    """Everything transform() needs to know. Round-trips through ``to_dict`` / ``from_dict``."""

    adapter: AdapterConfig | None = field(default_factory=AdapterConfig)
    """Global adapter; None skips every conv not configured more specifically."""
    by_type: dict[Any, AdapterConfig | None] = field(default_factory=dict)
    by_name_regex: list[tuple[str, AdapterConfig | None]] = field(default_factory=list)
    by_name: dict[str, AdapterConfig | None] = field(default_factory=dict)
    kernel_sizes: tuple[int | tuple[int, ...], ...] = (3,)
    """Kernel sizes that may be shared, in any rank. An int k means k in every spatial dim (3: a 1-D 3, a 3x3,
    a 3x3x3 kernel; 1 for pointwise sharing as in MobileNetV2) and, for a 3-D kernel, also the two halves of a
    (2+1)-D factorisation, 1xkxk (spatial) and kx1x1 (temporal), as in r2plus1d_18 and S3D. A tuple means that
    exact shape only (``((3, 3, 3),)`` keeps the (2+1)-D convs out; ``((1, 3),)`` takes a 2-D 1x3). Families
    never mix ranks nor shapes: the kernel size is part of a family's key."""
    depthwise: bool = False
    """Share depthwise convs (groups == C_in == C_out) too. Off by default, as in the reference."""
    share: bool = True
    """False: adapter-only mode, every eligible conv keeps its own kernel and gets adapters on it."""
    stage_depth: int = 1
    """A family lives inside one stage: the first ``stage_depth`` components of the path of the module that
    owns the conv (``layer1`` for ``layer1.0.conv1``; the model itself for a top-level conv). 0: whole model."""
    min_family_size: int = 2
    max_children: int | None = None
    """At most this many children per parent; a larger family is split, the next member becoming a parent."""
    include: str | None = None
    """Only convs whose name matches this regex (re.search) are considered."""
    exclude: str | None = None
    """Convs whose name matches this regex (re.search) are skipped."""
    parent: str = "first"
    """'first': a family's first member keeps its kernel and is the parent. 'centroid': the family gets a
    new shared kernel, initialised as the mean of the members' kernels, and every member (the first one
    included, which holds the new kernel) becomes a child with its own adapter."""
    policy: str = "position"
    """How families form among same-shaped convs. 'position': by graph order (the first member is the
    parent; ``max_children`` splits a family into consecutive runs). 'cka': by measured similarity of the
    convs' outputs (linear CKA on calibration data: ``kdna_fx.plan(model, config, data=images)``); the
    parent is the member most similar to the rest, and ``max_children`` splits a family into groups of
    similar convs with the same sizes as 'position' would give."""
    only_if_smaller: bool = True
    """Share a conv only when its adapter has fewer parameters than its kernel (thin grouped convs often don't)."""
    leaf_modules: tuple[type, ...] = ()
    """Module types kept opaque by tracing (added to kdna_fx.registry.NOT_TRACED)."""
    rewrite: str = "auto"
    """What transform returns. 'auto' (and 'swap', its old name): the user's model, each child conv module
    replaced in place by a ChildAdapter (docs/design.md). 'graph': that model's graph form (passes.lower, the
    design card's FX graph), checked against the model, or a KDNAError saying why there is none."""

    def __post_init__(self) -> None:
        self.kernel_sizes = tuple(k if isinstance(k, int) else tuple(k) for k in self.kernel_sizes)
        self.leaf_modules = tuple(self.leaf_modules)
        self.by_name_regex = [tuple(item) for item in self.by_name_regex]  # type: ignore[misc]
        if not self.kernel_sizes or not all(_kernel_size_ok(k) for k in self.kernel_sizes):
            raise ConfigError(f"kernel_sizes must be positive integers (k in every dim) or tuples of 1 to 3 of them "
                              f"(an exact shape such as (1, 3, 3)), got {self.kernel_sizes!r}")
        if self.policy not in ("position", "cka"):
            raise ConfigError(f"KDNAConfig.policy must be 'position' (families by graph order) or 'cka' (by "
                              f"measured output similarity, needs data), got {self.policy!r}")
        if self.rewrite not in ("auto", "graph", "swap"):
            raise ConfigError(f"KDNAConfig.rewrite must be 'auto' (the user's model, its convs shared in place), "
                              f"'graph' (its checked FX graph form) or 'swap' (as 'auto'), got {self.rewrite!r}")
        if self.parent not in ("first", "centroid"):
            raise ConfigError(f"KDNAConfig.parent must be 'first' or 'centroid', got {self.parent!r}")
        if self.stage_depth < 0:
            raise ConfigError(f"stage_depth must be >= 0, got {self.stage_depth}")
        if self.min_family_size < 2:
            raise ConfigError(f"min_family_size must be >= 2 (a family needs a parent and a child), "
                              f"got {self.min_family_size}")
        if self.max_children is not None and self.max_children < 1:
            raise ConfigError(f"max_children must be >= 1 or None, got {self.max_children}")
        for pattern in [p for p, _ in self.by_name_regex] + [self.include, self.exclude]:
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"invalid module-name regex {pattern!r}: {exc}") from None
        for key, value in [*self.by_type.items(), *self.by_name.items(), *self.by_name_regex]:
            if value is not None and not isinstance(value, AdapterConfig):
                raise ConfigError(f"the entry for {key!r} must be an AdapterConfig or None, got {type(value).__name__}")

    # ---- decisions -------------------------------------------------------------------------------
    def adapter_for(self, name: str, kind: Any) -> AdapterConfig | None:
        """The adapter for the conv called ``name`` of type ``kind`` (module type or F.conv2d)."""
        if name in self.by_name:
            return self.by_name[name]
        for pattern, adapter in self.by_name_regex:
            if re.search(pattern, name):
                return adapter
        for key, adapter in self.by_type.items():
            if kind is key:
                return adapter
        return self.adapter

    def shares_kernel(self, kernel_size: tuple[int, ...]) -> bool:
        """Whether ``kernel_sizes`` lets a conv of this kernel size be shared (see ``kernel_sizes``)."""
        shape = tuple(kernel_size)
        return shape in self.kernel_sizes or any(
            isinstance(k, int) and (set(shape) == {k} or (len(shape) == 3 and shape in ((1, k, k), (k, 1, 1))))
            for k in self.kernel_sizes)

    def map_adapters(self, fn: Callable[[AdapterConfig], AdapterConfig]) -> "KDNAConfig":
        """A copy with ``fn`` applied to every AdapterConfig at every level (None entries stay None)."""
        def f(a: AdapterConfig | None) -> AdapterConfig | None:
            return None if a is None else fn(a)

        return dataclasses.replace(self, adapter=f(self.adapter), by_type={k: f(v) for k, v in self.by_type.items()},
                                   by_name_regex=[(p, f(v)) for p, v in self.by_name_regex],
                                   by_name={k: f(v) for k, v in self.by_name.items()})

    def selected(self, name: str) -> str | None:
        """Why ``include``/``exclude`` drop this name, or None when they keep it."""
        if self.include is not None and not re.search(self.include, name):
            return f"name does not match include={self.include!r}"
        if self.exclude is not None and re.search(self.exclude, name):
            return f"name matches exclude={self.exclude!r}"
        return None

    def stage_of(self, name: str) -> str:
        owner = name.split(".")[:-1]
        return ".".join(owner[: self.stage_depth])

    # ---- plain-dict round trip -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; classes and functions are stored by their import path."""
        def adapter(value: AdapterConfig | None) -> dict[str, Any] | None:
            return None if value is None else dataclasses.asdict(value)

        return {
            "adapter": adapter(self.adapter),
            "by_type": {_qualname(k): adapter(v) for k, v in self.by_type.items()},
            "by_name_regex": [[p, adapter(v)] for p, v in self.by_name_regex],
            "by_name": {k: adapter(v) for k, v in self.by_name.items()},
            "kernel_sizes": [k if isinstance(k, int) else list(k) for k in self.kernel_sizes],
            "depthwise": self.depthwise,
            "share": self.share,
            "stage_depth": self.stage_depth,
            "min_family_size": self.min_family_size,
            "max_children": self.max_children,
            "include": self.include,
            "exclude": self.exclude,
            "parent": self.parent,
            "only_if_smaller": self.only_if_smaller,
            "leaf_modules": [_qualname(t) for t in self.leaf_modules],
            "policy": self.policy,
            "rewrite": self.rewrite,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KDNAConfig":
        known = {f.name for f in dataclasses.fields(cls)} | {"untraceable"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown KDNAConfig keys {unknown}; known keys are {sorted(known)}")

        def adapter(value: dict[str, Any] | None) -> AdapterConfig | None:
            return None if value is None else AdapterConfig(**value)

        kwargs = dict(data)
        if "untraceable" in kwargs:  # files saved before KDNAConfig.rewrite: 'error' meant graph or nothing
            kwargs.setdefault("rewrite", "graph" if kwargs.pop("untraceable") == "error" else "auto")
        if "adapter" in data:
            kwargs["adapter"] = adapter(data["adapter"])
        kwargs["by_type"] = {_import(k): adapter(v) for k, v in data.get("by_type", {}).items()}
        kwargs["by_name_regex"] = [(p, adapter(v)) for p, v in data.get("by_name_regex", [])]
        kwargs["by_name"] = {k: adapter(v) for k, v in data.get("by_name", {}).items()}
        kwargs["leaf_modules"] = tuple(_import(name) for name in data.get("leaf_modules", []))
        if "kernel_sizes" in data:
            kwargs["kernel_sizes"] = tuple(data["kernel_sizes"])
        return cls(**kwargs)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> "KDNAConfig":
        """The config in a JSON file holding ``to_dict``'s form (the ``--config`` of the commands)."""
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read a KDNAConfig dict as JSON from {os.fspath(path)!r} ({exc}); write one "
                              f"with json.dump(config.to_dict(), f)") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{os.fspath(path)!r} holds a JSON {type(data).__name__}, not a KDNAConfig dict")
        return cls.from_dict(data)


def _kernel_size_ok(k: Any) -> bool:
    if isinstance(k, tuple):
        return 1 <= len(k) <= 3 and all(_kernel_size_ok(v) for v in k)
    return isinstance(k, int) and not isinstance(k, bool) and k >= 1


def _qualname(obj: Any) -> str:
    if obj in _FUNCTION_NAMES:
        return _FUNCTION_NAMES[obj]
    return f"{obj.__module__}.{obj.__qualname__}"


def _import(path: str) -> Callable[..., Any] | type:
    module_name, _, attr = path.rpartition(".")
    try:
        obj: Any = importlib.import_module(module_name)
        return getattr(obj, attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"cannot import {path!r} named in the config; import the module that defines it "
                          f"or remove the entry") from None


__all__ = ["AdapterConfig", "KDNAConfig"]
