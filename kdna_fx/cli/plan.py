"""``kdna plan MODEL``: the family plan kdna_fx would build for a model, changing nothing.

MODEL is any name ``kdna_fx.models.create_model`` resolves: a zoo name (``resnet18``, ``resnet18.kdna``, an alias
such as ``kdna_resnet18``), ``torchvision/<name>`` or ``timm/<name>``, or a bare torchvision classifier name
(random weights: a plan depends on the architecture only). For a zoo model built transformed
(``kdna_*``, ``replace_*``) it prints the plan the model carries.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import kdna_fx
from kdna_fx.datamodel import converted_by
from kdna_fx.source import model_spec

from .options import add_model_options


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdna plan", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a zoo, torchvision/<name> or timm/<name> model name, e.g. resnet18")
    add_model_options(p, name=False)
    p.add_argument("--config", default=None, help="a JSON file with a KDNAConfig dict (KDNAConfig.to_dict)")
    p.add_argument("--kernel-sizes", type=int, nargs="+", default=None, help="KDNAConfig.kernel_sizes")
    p.add_argument("--stage-depth", type=int, default=None, help="KDNAConfig.stage_depth")
    p.add_argument("--depthwise", action="store_true", default=None, help="KDNAConfig.depthwise")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (Plan.to_dict)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    model = model_spec(args.model, width=args.width, small_stem=args.small_stem, num_classes=args.num_classes,
                       in_chans=args.in_chans).build()
    config = kdna_fx.KDNAConfig.read(args.config) if args.config else kdna_fx.models.sharing_config(args.model)
    given = {"kernel_sizes": tuple(args.kernel_sizes) if args.kernel_sizes else None,
             "stage_depth": args.stage_depth, "depthwise": args.depthwise}
    config = dataclasses.replace(config, **{k: v for k, v in given.items() if v is not None})
    # A zoo reference topology (kdna_*) or replace-mode model is built transformed: its plan is its own.
    plan = kdna_fx.plan_of(model) if converted_by(model) else kdna_fx.plan(model, config)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
