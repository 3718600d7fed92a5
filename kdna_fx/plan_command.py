"""``kdna plan MODEL``: the family plan kdna_fx would build for a torchvision model."""
from __future__ import annotations

import argparse
import json

import torchvision

import kdna_fx


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kdna plan", description=__doc__)
    parser.add_argument("model", help="a torchvision classification builder, e.g. resnet18")
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=[3])
    parser.add_argument("--stage-depth", type=int, default=1)
    parser.add_argument("--depthwise", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    available = torchvision.models.list_models(module=torchvision.models)
    if args.model not in available:
        parser.error(f"unknown model {args.model!r}; choose one of: {', '.join(available)}")
    model = torchvision.models.get_model(args.model, weights=None)
    config = kdna_fx.KDNAConfig(kernel_sizes=tuple(args.kernel_sizes), stage_depth=args.stage_depth,
                                depthwise=args.depthwise)
    plan = kdna_fx.plan(model, config)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
