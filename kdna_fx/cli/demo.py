"""The main job, end to end in a few minutes on 2 CPU cores.

1. transform torchvision ResNet-18, print the report, check fold and torch.compile against eager, time them;
2. train the baseline, replace mode and the reference topology briefly on Fashion-MNIST, evaluate, compare.
"""
from __future__ import annotations

import argparse

import torch
import torchvision

import kdna_fx
from kdna_fx.testing import randomize_adapters

from kdna_fx.timing import time_call


def run(image_size: int = 128, batch: int = 8, compile: bool = True) -> dict[str, float]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    kmodel = kdna_fx.transform(model).eval()
    print(kdna_fx.report(kmodel), flush=True)

    # Give the adapters non-trivial values so the checks below mean something (they start at identity).
    randomize_adapters(kmodel, scale=0.1)
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
    parser = argparse.ArgumentParser(prog="kdna demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128, help="input size for the checks and timing")
    parser.add_argument("--batch", type=int, default=8, help="batch size for the checks and timing")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (fast smoke run)")
    parser.add_argument("--no-train", action="store_true", help="skip the Fashion-MNIST training comparison")
    parser.add_argument("--train-subset", type=int, default=3000, help="Fashion-MNIST training images used")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    print("== 1. transform, report, fold and compile checks ==", flush=True)
    run(args.image_size, args.batch, not args.no_compile)
    if not args.no_train:
        from kdna_fx.train import quick_compare

        print("\n== 2. brief training on Fashion-MNIST: baseline vs replace mode vs reference topology ==",
              flush=True)
        quick_compare(("resnet18", "replace_resnet18", "kdna_resnet18"), epochs=args.epochs,
                      train_subset=args.train_subset, val_subset=2000)
