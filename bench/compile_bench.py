"""Eager vs torch.compile (Inductor) inference speed of original, transformed and folded models.

    .venv/bin/python bench/compile_bench.py --model resnet18 --batch 8 --image-size 224

Writes bench/results/compile_<model>_<device>.{json,md,png}: numbers, the exact command, machine and versions.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torchvision
from tqdm import tqdm

import kdna_fx
from kdna_fx.timing import markdown_table, provenance, time_call, write_results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="torchvision classification builder")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    original = torchvision.models.get_model(args.model, weights=None).eval().to(device)
    kmodel = kdna_fx.transform(original).eval()
    folded = kdna_fx.fold(kmodel)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    params = {"original": original, "kdna": kmodel, "kdna folded": folded}

    rows, results = [], []
    variants = [(name, compiled) for name in params for compiled in (False, True)]
    for name, compiled in tqdm(variants, desc="variants", unit="variant"):
        model = params[name]
        run = torch.compile(model, fullgraph=True) if compiled else model

        def call():
            run(x)
            sync()

        timing = time_call(call, warmup=3, repeat=args.repeat)
        n_params = sum(p.numel() for p in model.parameters())
        result = {"model": name, "compiled": compiled, "params": n_params, **timing,
                  "images_per_s": args.batch / timing["median_s"]}
        results.append(result)
        rows.append([name, "Inductor" if compiled else "eager", f"{n_params:,}", f"{1000 * timing['median_s']:.1f}",
                     f"{result['images_per_s']:.1f}"])
    base = next(r for r in results if r["model"] == "original" and not r["compiled"])
    for row, r in zip(rows, results):
        row.append(f"{r['images_per_s'] / base['images_per_s']:.2f}x")

    stem = os.path.join(args.out, f"compile_{args.model}_{device.type}")
    table = (f"### {args.model}: batch {args.batch}, {args.image_size}x{args.image_size}, {device.type}, eval\n\n"
             + markdown_table(["model", "mode", "params", "median ms", "images/s", "vs original eager"], rows))
    write_results(stem, {"provenance": provenance(["bench/compile_bench.py", *(argv or sys.argv[1:])]),
                         "settings": vars(args), "results": results}, table)
    _plot(stem, results, args)
    print(table)


def _plot(stem: str, results: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{'Inductor' if r['compiled'] else 'eager'}" for r in results]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(labels, [r["images_per_s"] for r in results],
           color=["#999999" if not r["compiled"] else "#2b7bba" for r in results])
    ax.set_ylabel("images / s")
    ax.set_title(f"{args.model}, batch {args.batch}, {args.image_size}px, {args.device}")
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=110)


if __name__ == "__main__":
    main()
