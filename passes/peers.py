"""Pass: replace chosen nn.Conv2d modules by dynamic-convolution peers (CondConv, DY-Conv, ODConv, ...).

The sites come from the same pipeline as the transform's (kdna_fx/_pipeline.py: unwrap, route, find), so
a peer converts what KernelDNA would share. Each chosen conv module is swapped for ``make(conv)`` under the
same path, in the model's own module tree. The pass leaves a PeerRecord (kdna_fx.datamodel), which
kdna_fx.peers.describe reads.
"""
from __future__ import annotations

import warnings
from typing import Callable

from torch import nn

from kdna_fx.datamodel import ConvSite, PeerRecord, Skipped, attach_peer, refuse_converted
from kdna_fx.errors import NoEligibleConvWarning, SkippedSiteWarning

from .find import first_in_channels
from .sites import not_for_peers


def swap_convs(gm: nn.Module, sites: list[ConvSite], skipped: list[Skipped], make: Callable[[nn.Conv2d], nn.Module],
               method: str) -> nn.Module:
    """Replace, in place, the conv module of every site of ``gm`` (found by passes.find_modules) by ``make(conv)``."""
    refuse_converted(gm)
    params_before = sum(p.numel() for p in gm.parameters())
    in_channels = first_in_channels(gm)
    skipped = list(skipped)
    converted = []
    for site in sites:
        reason = not_for_peers(site)
        if reason is not None:
            warnings.warn(f"kdna_fx left {site.name!r} as it was: {reason}", SkippedSiteWarning, stacklevel=3)
            skipped.append(Skipped(site.name, reason))
            continue
        owner_path, _, leaf = site.name.rpartition(".")
        conv = gm.get_submodule(site.name)
        setattr(gm.get_submodule(owner_path), leaf, make(conv).train(conv.training))  # new modules start in train mode
        converted.append(site.name)
    if not converted:
        warnings.warn(f"kdna_fx found no convolution to turn into {method} in the model; it is returned unchanged "
                      f"KDNAConfig(kernel_sizes=(1, 3), depthwise=True) widens the search.",
                      NoEligibleConvWarning, stacklevel=3)
    record = PeerRecord(method=method, params_before=params_before, converted=tuple(converted),
                        skipped=tuple(skipped), in_channels=in_channels)
    attach_peer(gm, record)
    return gm
