"""``kdna convert SOURCE --model NAME``: convert a trained model into a KernelDNA model, without labels.

SOURCE is a ``kdna train`` run directory (model options and data come from the run) or a state-dict file
(.pt or .safetensors, with the model options given here). The converted model is written with
kdna_fx.save (reload it with ``kdna_fx.load(path, fresh_original_model)``), and beside it a Markdown and a
JSON report: parameters, top-1 and agreement with the original right after conversion, after
calibration and after the optional fine-tune, and the time of each step.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import tempfile
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import kdna_fx

from .config import KDNAConfig
from .models import sharing_config
from .source import build_original, load_source
from .errors import ConfigError, KDNAError, StateError
from .tables import format_table


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdna convert", description=__doc__.splitlines()[0])
    p.add_argument("source", help="a `kdna train` run directory, or a state dict (.pt / .safetensors)")
    p.add_argument("--model", default=None, help="zoo or torchvision name of the original architecture "
                                                 "(default: the run's model)")
    p.add_argument("--width", type=float, default=None, help="width of the original (state-dict sources)")
    p.add_argument("--small-stem", action="store_true", default=None, help="small stem (state-dict sources)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the original (state-dict sources)")
    p.add_argument("--config", default=None, help="a JSON file with a KDNAConfig dict (KDNAConfig.to_dict)")
    p.add_argument("--rank", type=int, default=None, help="low-rank residual per child (AdapterConfig.rank)")
    p.add_argument("--parent", choices=("first", "centroid"), default=None, help="KDNAConfig.parent")
    p.add_argument("--calib-images", type=int, default=1024, help="unlabeled training images for calibration")
    p.add_argument("--steps", type=int, default=300, help="distillation steps")
    p.add_argument("--train", choices=("adapters", "parents", "all"), default="parents",
                   help="what distillation trains (kdna_fx.calibrate's train)")
    p.add_argument("--features", type=float, default=1.0,
                   help="weight of the per-layer loss on norm outputs (kdna_fx.calibrate's features; 0: logits only)")
    p.add_argument("--val-images", type=int, default=2000, help="validation images for the report (0: all)")
    p.add_argument("--finetune-epochs", type=float, default=0, help="labelled fine-tune after calibration")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the fine-tune, after a check of its gradients against eager (docs/training.md)")
    p.add_argument("--data", dest="data_path", default=None, help="data location (default: the run's, or "
                                                                   "the Fashion-MNIST package)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output .safetensors (default: <source>.kdna.safetensors)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


@torch.no_grad()
def _score(model: nn.Module, original: nn.Module, loader: DataLoader) -> dict[str, float]:
    model.eval()
    correct = agree = count = 0
    for x, y in loader:
        out, ref = model(x).argmax(1), original(x).argmax(1)
        correct += (out == y).sum().item()
        agree += (out == ref).sum().item()
        count += len(y)
    return {"top1": 100.0 * correct / count, "agreement": agree / count}


def _read_config(path: str) -> KDNAConfig:
    try:
        with open(path) as f:
            return KDNAConfig.from_dict(json.load(f))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--config {path!r}: cannot read a KDNAConfig dict as JSON ({exc})") from None


def _images(data: Dataset, n: int, seed: int) -> torch.Tensor:
    """``n`` training images drawn with ``seed``, as they are: calibration matches the original on real
    images, so the training augmentation (Fashion-MNIST's shifts and flips) is switched off."""
    if getattr(data, "augment", False):
        data = copy.copy(data)
        data.augment = False  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data), generator=g)[:n].tolist()
    return torch.stack([data[i][0] for i in index])


def convert(args: argparse.Namespace) -> dict[str, Any]:
    from .data import build_data

    spec, data_spec, state = load_source(args.source, args.model, width=args.width, small_stem=args.small_stem,
                                         num_classes=args.num_classes)
    if args.data_path:
        data_spec["path"] = args.data_path
    data = build_data(data_spec.get("dataset", "fashion-mnist"), data_spec.get("path"), seed=args.seed,
                      image_size=data_spec.get("image_size"), val_subset=args.val_images or None)
    if args.calib_images < 1:
        raise ConfigError(f"--calib-images must be >= 1, got {args.calib_images}")
    spec = {**spec, "num_classes": data.num_classes, "in_chans": data.in_chans}
    original = build_original(spec)
    try:
        original.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise StateError(f"the weights in {args.source!r} do not fit {spec['name']} with options "
                         f"{ {k: v for k, v in spec.items() if k != 'name'} }: {str(exc).splitlines()[0]}. Give the "
                         f"options the model was trained with (--width, --small-stem).") from None
    original.eval()
    config = _read_config(args.config) if args.config else sharing_config(spec["name"])
    if args.rank is not None:
        config = config.map_adapters(lambda a: dataclasses.replace(a, rank=args.rank))
    if args.parent is not None:
        config = dataclasses.replace(config, parent=args.parent)
    steps: dict[str, dict[str, Any]] = {}
    val = DataLoader(data.val, batch_size=256)
    steps["original"] = {**_score(original, original, val), "seconds": 0.0}
    calib = _images(data.train, args.calib_images, args.seed)
    start = time.perf_counter()
    with torch.no_grad():  # the calibration images also check the trace (docs/partial-tracing.md)
        kmodel = kdna_fx.transform(original, config, init="trained", example_inputs=(calib[:8],))
    if not kdna_fx.plan_of(kmodel).families:
        raise KDNAError(f"{spec['name']} has no conv kdna_fx can share under this config: nothing to convert "
                        f"(kdna_fx.plan(model, config) lists each conv with its reason)")
    steps["converted"] = {**_score(kmodel, original, val), "seconds": time.perf_counter() - start}
    start = time.perf_counter()
    report = kdna_fx.calibrate(kmodel, calib, reference=original, steps=args.steps, train=args.train,
                               features=args.features, seed=args.seed, progress=args.progress)
    steps["calibrated"] = {**_score(kmodel, original, val), "seconds": time.perf_counter() - start}
    if args.finetune_epochs > 0:
        from .train import TrainConfig, train

        start = time.perf_counter()
        epochs = max(1, round(args.finetune_epochs))
        train(kmodel, data.train, None, TrainConfig(epochs=epochs, batch_size=128, lr=0.01, warmup_epochs=0,
                                                    seed=args.seed, amp="none", progress=args.progress,
                                                    compile=args.compile),
              tempfile.mkdtemp(prefix="kdna_convert_"))
        steps["fine-tuned"] = {**_score(kmodel, original, val), "seconds": time.perf_counter() - start}
    params = {"original": sum(p.numel() for p in original.parameters()),
              "converted": sum(p.numel() for p in kmodel.parameters())}
    out = args.out or f"{args.source.rstrip('/')}.kdna.safetensors"
    tmp = f"{out}.tmp"
    kdna_fx.save(kmodel, tmp)  # written whole, then renamed: nothing half-written is left at --out
    os.replace(tmp, out)
    from .timing import provenance

    result = {"source": args.source, "model": spec, "config": config.to_dict(), "params": params,
              "steps": steps, "calibration": report.to_dict(), "out": out,
              "provenance": provenance(["kdna", "convert", *args.argv])}
    stem = out[: -len(".safetensors")] if out.endswith(".safetensors") else out
    table = format_table(["step", "top-1 %", "agreement", "seconds"],
                         [[k, f"{v['top1']:.2f}", f"{v['agreement']:.3f}", f"{v['seconds']:.1f}"]
                          for k, v in steps.items()],
                         title=f"{spec['name']}: {params['original']:,} -> {params['converted']:,} parameters")
    with open(f"{stem}.json", "w") as f:
        json.dump(result, f, indent=2, default=str)
    with open(f"{stem}.md", "w") as f:
        machine = result["provenance"]["machine"]
        f.write(f"```\n{table}\n```\n\nCommand: `kdna convert {' '.join(args.argv)}`  \n"
                f"Machine: {machine['cpu']}, {machine['cores']} cores, GPU: {machine['gpu']}  \n"
                f"Versions: {', '.join(f'{k} {v}' for k, v in result['provenance']['versions'].items())}\n")
    print(table)
    print(f"wrote {out} (reload: kdna_fx.load(path, <fresh {spec['name']}>)), {stem}.md, {stem}.json")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(argv or [])
    convert(args)
    return 0
