"""``kdna models [patterns] [options]``: parameters and MACs of zoo models.

Defaults: 1000 classes, one 3x224x224 image. ``--small`` measures the small CPU setting instead
(10 classes, 1x28x28, small_stem, width 0.25 where a model takes width).
"""
from __future__ import annotations

import argparse
import warnings

import torch

from kdna_fx.errors import ConfigError
from kdna_fx.models import create_model, list_models, model_options
from kdna_fx.reporting import count_macs
from kdna_fx.tables import format_table


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdna models", description=__doc__.splitlines()[0])
    p.add_argument("patterns", nargs="*", default=["*.plain", "*.replace", "*.kdna"],
                   help="shell-style model name patterns (default: the plain, replace and kdna tags)")
    p.add_argument("--small", action="store_true", help="10 classes, 1x28x28, small_stem, width 0.25")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    # A pattern without a tag ("resnet18", "*resnet*") names every tag of what it matches.
    names = list(dict.fromkeys(n for pattern in args.patterns
                               for n in list_models(pattern if "." in pattern else f"{pattern}.*")))
    if not names:
        raise ConfigError(f"no zoo model matches {args.patterns}; the names are {', '.join(list_models())}")
    kwargs, shape = (dict(num_classes=10, in_chans=1, small_stem=True), (1, 1, 28, 28)) if args.small \
        else ({}, (1, 3, 224, 224))
    rows = []
    for name in names:
        options = dict(kwargs)
        if args.small and "width" in model_options(name):
            options["width"] = 0.25
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = create_model(name, **options)
        macs, gate_macs = count_macs(model, torch.randn(*shape))
        rows.append([name, f"{sum(p.numel() for p in model.parameters()):,}", f"{macs / 1e6:,.2f} M",
                     f"{gate_macs / 1e6:,.3f} M"])
    print(format_table(["model", "params", "MACs", "of which gates"], rows,
                       title=f"input {'x'.join(map(str, shape))}, options {kwargs or 'defaults'}"
                             + (" (+ width=0.25 where taken)" if args.small else "")))

