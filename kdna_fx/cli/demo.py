"""What KernelDNA buys on ResNet-18, in one screen and a few minutes on 2 CPU cores.

1. torchvision's ResNet-18 (1000 classes, random weights) and its KernelDNA form (kdna_fx.transform, random
   adapters) side by side: parameters, the kdna_fx.save file, the exported deploy file (kdna_fx.export, checked
   against eager), and the speed of the deploy forms at batch 1 and 8: both compiled with Inductor freezing
   (which folds KernelDNA's kernels), timed interleaved; with --no-compile, the original and kdna_fx.fold's
   model in eager mode.
2. Accuracy: the committed frontier study (Fashion-MNIST, 15 epochs, seeds 0-2), read from its record
   (bench/results/frontier/frontier.json): a brief training run here would be noise.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import tempfile
from typing import Any, Callable

import torch
import torch._inductor.config
from torch import nn

import kdna_fx
from kdna_fx.models import create_model
from kdna_fx.tables import format_table
from kdna_fx.testing import randomize_adapters
from kdna_fx.timing import time_interleaved

FRONTIER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "bench", "results", "frontier", "frontier.json")
# The frontier's rows at ResNet-18 width 0.25 (the plain rows are the curve the others are read against).
FRONTIER_ROWS = ("plain-w0.125", "plain-w0.1875", "plain-w0.25", "replace-w0.25", "kdna-w0.25")


def _files(model: nn.Module, shape: tuple[int, int, int], directory: str, name: str) -> dict[str, int]:
    """Bytes of ``model``'s kdna_fx.save file and of its deploy file (ONNX where onnxruntime is installed)."""
    save_path = os.path.join(directory, f"{name}.safetensors")
    kdna_fx.save(model, save_path)
    fmt = "onnx" if importlib.util.find_spec("onnxruntime") else "pt2"
    with contextlib.redirect_stderr(io.StringIO()):  # the exporters' warnings; a failure still raises
        report = kdna_fx.export(model, os.path.join(directory, f"{name}.{fmt}"), input_shape=shape, format=fmt,
                                dynamic_batch=True)
    return {"save": os.path.getsize(save_path), "export": report.bytes, "export_format": fmt,
            "export_difference": report.max_difference}


def _speeds(calls: dict[str, Callable[[torch.Tensor], Any]], shape: tuple[int, int, int],
            batches: tuple[int, ...], compile: bool) -> dict[int, dict[str, float]]:
    """Median ms per call of each model at each batch, the models timed interleaved."""
    out = {}
    # Freezing makes the parameters constants, so Inductor folds each child's P(1+F)(1+S) (docs/deployment.md).
    with torch._inductor.config.patch(freezing=True) if compile else contextlib.nullcontext():
        for batch in batches:
            x = torch.randn(batch, *shape)
            timed = time_interleaved({k: (lambda fn=fn: fn(x)) for k, fn in calls.items()}, warmup=2, rounds=5,
                                     repeat=3)
            out[batch] = {k: 1000 * t["median_s"] for k, t in timed.items()}
    return out


def compare(image_size: int = 128, batches: tuple[int, ...] = (1, 8), compile: bool = True) -> dict[str, Any]:
    """ResNet-18 and its KernelDNA form side by side (the table this command prints), as numbers."""
    torch.manual_seed(0)
    model = create_model("torchvision/resnet18").eval()
    kmodel = kdna_fx.transform(model).eval()
    randomize_adapters(kmodel, scale=0.1)  # children that differ from their parents, so the checks mean something
    families = kdna_fx.plan_of(kmodel).families
    print(f"kdna_fx.transform: {sum(len(f.children) for f in families)} convs of ResNet-18 now reuse the kernel of "
          f"one of {len(families)} parents through light adapters (`kdna plan torchvision/resnet18` lists them)",
          flush=True)
    shape = (3, image_size, image_size)
    deploy = kdna_fx.fold(kmodel)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        fold_difference = (deploy(x) - kmodel(x)).abs().max().item()
    print("saving and exporting both models (each file is checked against eager)...", flush=True)
    with tempfile.TemporaryDirectory(prefix="kdna_demo_") as directory:
        files = {"original": _files(model, shape, directory, "original"),
                 "kdna": _files(kmodel, shape, directory, "kdna")}
    if compile:
        print("compiling both with torch.compile (Inductor, freezing), per batch size; a minute each on 2 cores...",
              flush=True)
        calls = {"original": torch.compile(model, dynamic=False), "kdna": torch.compile(kmodel, dynamic=False)}
    else:
        calls = {"original": model, "kdna": deploy}
    return {"params": {"original": sum(p.numel() for p in model.parameters()),
                       "kdna": sum(p.numel() for p in kmodel.parameters())},
            "files": files, "fold_max_abs_diff": fold_difference, "image_size": image_size, "compiled": compile,
            "ms": _speeds(calls, shape, batches, compile), "threads": torch.get_num_threads()}


def compare_table(result: dict[str, Any]) -> str:
    files, ms = result["files"], result["ms"]
    fmt = files["kdna"]["export_format"]
    rows = [["parameters", f"{result['params']['original']:,}", f"{result['params']['kdna']:,}"],
            ["kdna_fx.save file, MB", f"{files['original']['save'] / 1e6:.1f}", f"{files['kdna']['save'] / 1e6:.1f}"],
            [f"{fmt} deploy file, MB", f"{files['original']['export'] / 1e6:.1f}",
             f"{files['kdna']['export'] / 1e6:.1f}"]]
    for batch, t in ms.items():
        rows.append([f"batch {batch}: ms per call", f"{t['original']:.1f}",
                     f"{t['kdna']:.1f} ({t['original'] / t['kdna']:.2f}x the throughput)"])
    mode = "both compiled, Inductor freezing" if result["compiled"] else "eager: the original and kdna_fx.fold's model"
    size = result["image_size"]
    return (format_table(["", "ResNet-18", "KernelDNA ResNet-18"], rows) + "\n"
            f"speed: {mode}, {size}x{size} px, {result['threads']} threads, interleaved (a shared machine: read the "
            f"ratio); the {fmt} files hold the shared form, which the runtime folds when it loads them; folded vs "
            f"unfolded eager max |diff| {result['fold_max_abs_diff']:.1e}")


def frontier_summary(path: str = FRONTIER) -> str:
    """The frontier study's ResNet-18 rows, read from its committed record, and one line on what they mean."""
    if not os.path.exists(path):
        return f"no frontier record at {path} (an installed copy without the repository): see the project's README"
    with open(path) as f:
        record = json.load(f)
    rows = {r["row"]: r for r in record["rows"]}
    verdicts = {t["row"]: dict(t["params"], seeds=t["seeds"], provisional=t["provisional"]) for t in record["targets"]}
    table = []
    for name in FRONTIER_ROWS:
        r, verdict = rows[name], verdicts.get(name)
        judged = f"{verdict['seeds']} seeds: not judged" if verdict and verdict["provisional"] else \
            verdict and verdict["outcome"]
        versus = f"{verdict['gain']:+.2f} ({judged})" if verdict else ""
        table.append([r["label"], f"{r['params']:,}", f"{r['top1_mean']:.2f} [{r['top1_min']:.2f}, {r['top1_max']:.2f}]",
                      versus])
    settings, kdna = record["settings"], verdicts["kdna-w0.25"]
    # Fewer than 3 seeds are reported, never judged (the paired rule of bench.common).
    meaning = (f"not judged: {kdna['seeds']} seeds, fewer than 3 (bench/results/frontier/retired holds the runs not "
               f"tied to committed code)" if kdna["provisional"] else
               "the same accuracy as a plain ResNet-18 narrowed to its parameter count (the seed ranges overlap): "
               "what it buys is fewer stored weights, not accuracy" if kdna["outcome"] == "tie" else
               f"{kdna['outcome']} the plain-width curve at equal parameters on each of its {kdna['seeds']} seeds")
    return (f"Fashion-MNIST, {settings['epochs']} epochs, seeds {settings['seeds']}, top-1 % mean [worst, best seed]:\n"
            + format_table(["model", "parameters", "top-1 %", "vs plain curve @ params"], table)
            + f"\nfrom `{record['provenance']['command']}` at commit {record['git']['commit'][:10]} "
              f"(bench/results/frontier/frontier.md)\n"
            + f"what it means: KernelDNA at width 0.25 scores {kdna['gain']:+.2f} points against the plain curve, "
              f"{meaning}.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kdna demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128, help="input size of the deploy files and timing")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8], help="batch sizes timed")
    parser.add_argument("--no-compile", action="store_true", help="time in eager mode (a fast smoke run)")
    parser.add_argument("--no-train", action="store_true", help="leave out the accuracy part")
    args = parser.parse_args(argv)
    print("== 1. ResNet-18 and its KernelDNA form ==", flush=True)
    print(compare_table(compare(args.image_size, tuple(args.batch_size), not args.no_compile)), flush=True)
    if not args.no_train:
        print("\n== 2. accuracy at equal parameters (the frontier study) ==")
        print(frontier_summary())
