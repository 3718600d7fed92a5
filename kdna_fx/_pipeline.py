"""The one private pipeline behind every conversion (kdna_fx.transform, kdna_fx.plan and the peers):
check the config, unwrap, copy, order the convs (passes.routing), find them.

The public phases are thin layers over it, as torch.ao.quantization's FX mode is over its ``_prepare``:
what the transform and the peers do alike is done here once, so a peer converts exactly the convs the
transform would share.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import passes
from .config import KDNAConfig
from .datamodel import ConvSite, Skipped
from .errors import KDNAError, KDNATypeError


@dataclass
class Prepared:
    """A model ready for a conversion: its (copied) module, the config, the route (conv order) and its convs,
    eligible and skipped."""

    module: nn.Module
    config: KDNAConfig
    route: passes.Route
    sites: list[ConvSite]
    skipped: list[Skipped]


def prepare(model: object, config: KDNAConfig | None, *, inplace: bool = False, example_inputs: Any = None,
            example_kwargs: dict[str, Any] | None = None, gates: bool = True) -> Prepared:
    """Unwrap and (unless ``inplace``) copy ``model``, route it and find its convs under ``config``.
    ``gates``: resolve ``gate_norm="auto"`` for this model (KernelDNA's gates; the peers have none)."""
    config = config if config is not None else KDNAConfig()
    if not isinstance(config, KDNAConfig):
        raise KDNATypeError(f"config must be a kdna_fx.KDNAConfig, got {type(config).__name__}")
    module = passes.unwrap(model)  # refuses wrapped twice, compiled or data-parallel models are unwrapped
    if not inplace:
        # Tracing shares leaf modules and tensors with the original; a copy keeps the caller's model intact.
        try:
            module = copy.deepcopy(module)
        except RuntimeError as exc:
            raise KDNAError(f"kdna_fx could not copy {type(module).__name__} before changing it (torch: "
                            f"{str(exc).splitlines()[0]}). Pass inplace=True to transform the model itself; a "
                            f"hook-based torch.nn.utils.weight_norm cannot be copied by torch, while "
                            f"torch.nn.utils.parametrizations.weight_norm can.") from exc
    if gates:
        config = _resolve_gates(config, module)
    route = passes.route(module, config, passes.Example.of(example_inputs, example_kwargs))
    sites, skipped = passes.find_modules(module, config, order=route.order)
    return Prepared(module, config, route, sites, skipped + route.functional)


def _resolve_gates(config: KDNAConfig, module: nn.Module) -> KDNAConfig:
    """``gate_norm="auto"`` made concrete for this model: the reference's BatchNorm when the model itself holds
    one (it cannot train at batch 1 either), else LayerNorm, which trains at any batch size (FrozenBatchNorm2d,
    GroupNorm and LayerNorm models: detectors and segmentation nets trained at batch 1-2)."""
    norm = "batch" if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()) else "layer"
    return config.map_adapters(lambda a: dataclasses.replace(a, gate_norm=norm) if a.gate_norm == "auto" else a)
