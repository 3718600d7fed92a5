"""The main job: transform torchvision ResNet-18, report, check fold and compile, time eager vs compiled."""
from __future__ import annotations

import argparse

import torch
import torchvision

import kdna_fx

from ._bench import time_call


def run(image_size: int = 128, batch: int = 8, compile: bool = True) -> dict[str, float]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    kmodel = kdna_fx.transform(model).eval()
    print(kdna_fx.report(kmodel), flush=True)

    # Give the adapters non-trivial values so the checks below mean something (they start at identity).
    with torch.no_grad():
        for name, p in kmodel.named_parameters():
            if name.endswith(("filter_scale", "spatial_scale")):
                p.normal_(0, 0.1)
    x = torch.randn(batch, 3, image_size, image_size)
    with torch.no_grad():
        eager = kmodel(x)
        folded = kdna_fx.fold(kmodel)(x)
    results = {"fold_max_abs_diff": (folded - eager).abs().max().item()}
    print(f"\nfold vs eager: max |diff| = {results['fold_max_abs_diff']:.2e}")
    timings = {"original eager": time_call(lambda: model(x)), "kdna eager": time_call(lambda: kmodel(x))}
    if compile:
        print("compiling with torch.compile (Inductor, fullgraph); the first compile takes a minute on 2 cores...",
              flush=True)
        compiled = torch.compile(kmodel, fullgraph=True)
        with torch.no_grad():
            results["compile_max_abs_diff"] = (compiled(x) - eager).abs().max().item()
        print(f"compiled vs eager: max |diff| = {results['compile_max_abs_diff']:.2e}")
        timings["kdna compiled"] = time_call(lambda: compiled(x))
    print(f"\nforward time, batch {batch} at {image_size}x{image_size}, {torch.get_num_threads()} threads:")
    for name, t in timings.items():
        print(f"  {name:16s} {1000 * t['median_s']:8.1f} ms  ({batch / t['median_s']:.1f} images/s)")
        results[f"{name} ms"] = 1000 * t["median_s"]
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kdna demo", description=__doc__)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (fast smoke run)")
    args = parser.parse_args(argv)
    run(args.image_size, args.batch, not args.no_compile)
