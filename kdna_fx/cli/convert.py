"""``kdna convert SOURCE --model NAME``: convert a trained model into a KernelDNA model, without labels.

SOURCE is a ``kdna train`` run directory (model options and data come from the run) or a state-dict file
(.pt or .safetensors, with the model options given here). The converted model is written with
kdna_fx.save (reload it with ``kdna_fx.load(path)``; the command prints the call, which needs a fresh model
only for one that kdna_fx.models.create_model did not build), and beside it a Markdown and a
JSON report: parameters, top-1 and agreement with the original right after conversion, after
calibration and after the optional fine-tune, and the time of each step. The work is kdna_fx.convert's;
this module only reads the source and writes the files.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import kdna_fx

from kdna_fx.calibration import CalibrationConfig
from kdna_fx.config import KDNAConfig
from kdna_fx.errors import ConfigError
from kdna_fx.models import record_input, sharing_config, spec_of
from kdna_fx.source import resolve_source
from kdna_fx.tables import format_table
from kdna_fx.timing import provenance, write_results
from kdna_fx.train import TrainConfig
from kdna_fx.utils import atomic_path

from .options import add_data, add_model_options, add_out, add_progress, data_spec


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdna convert", description=__doc__.splitlines()[0])
    p.add_argument("source", help="a `kdna train` run directory, or a state dict (.pt / .safetensors)")
    add_model_options(p, what="the original architecture")
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
    add_data(p, dataset_default=None)  # the run's data set, else (a state dict) Fashion-MNIST
    p.add_argument("--seed", type=int, default=0)
    add_out(p, "the converted model, a .safetensors file (default: <source>.kdna.safetensors); its reports go "
               "beside it as <out stem>.md and .json")
    add_progress(p)
    return p


def _images(data: Dataset, n: int, seed: int) -> torch.Tensor:
    """``n`` training images drawn with ``seed``, as they are: calibration matches the original on real
    images, so the training augmentation (Fashion-MNIST's shifts and flips) is switched off."""
    if getattr(data, "augment", False):
        data = copy.copy(data)
        data.augment = False  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data), generator=g)[:n].tolist()
    return torch.stack([data[i][0] for i in index])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the source, call kdna_fx.convert, write the model and its reports."""

    source = resolve_source(args.source, args.model, width=args.width, small_stem=args.small_stem,
                            num_classes=args.num_classes)
    if source.state is None:
        raise ConfigError(f"kdna convert converts trained weights: SOURCE {args.source!r} must be a `kdna train` run "
                          f"directory or a state dict (.pt / .safetensors)")
    data = data_spec(args, source.data, val_subset=args.val_images or None).build(args.seed)
    if args.calib_images < 1:
        raise ConfigError(f"--calib-images must be >= 1, got {args.calib_images}")
    source = source.fit(num_classes=data.num_classes, in_chans=args.in_chans or data.in_chans)
    spec = source.spec
    original = source.build(args.seed)
    config = KDNAConfig.read(args.config) if args.config else sharing_config(spec.name)
    if args.rank is not None:
        config = config.map_adapters(lambda a: dataclasses.replace(a, rank=args.rank))
    if args.parent is not None:
        config = dataclasses.replace(config, parent=args.parent)
    val = DataLoader(data.val, batch_size=256)
    calibration = CalibrationConfig(steps=args.steps, train=args.train, features=args.features, seed=args.seed,
                                    progress=args.progress)
    finetune = finetune_config = None
    if args.finetune_epochs > 0:
        finetune = data.train
        finetune_config = TrainConfig(epochs=max(1, round(args.finetune_epochs)), batch_size=128, lr=0.01,
                                      warmup_epochs=0, seed=args.seed, amp="none", progress=args.progress,
                                      compile=args.compile)
    images = _images(data.train, args.calib_images, args.seed)
    result = kdna_fx.convert(original, images, config,
                             calibration=calibration, finetune=finetune, finetune_config=finetune_config,
                             evaluate={"val": val})
    kmodel = result.model
    record_input(kmodel, image_size=images.shape[-1], in_chans=images.shape[1])  # `kdna export` reads it
    steps = {"original": {**kdna_fx.conversion.score(original, original, val), "seconds": 0.0}}
    steps.update({stage: {**v["val"], "seconds": v["seconds"]} for stage, v in result.stages.items()})
    params = result.params
    out = args.out or f"{args.source.rstrip('/')}.kdna.safetensors"
    with atomic_path(out, suffix=".tmp.safetensors") as tmp:  # nothing half-written is left at --out
        kdna_fx.save(kmodel, tmp)
    record = {"source": args.source, "model": spec.to_dict(), "config": config.to_dict(), "params": params,
              "steps": steps, "calibration": result.calibration.to_dict() if result.calibration else None,
              "out": out, "provenance": provenance(["kdna", "convert", *args.argv])}
    stem = out[: -len(".safetensors")] if out.endswith(".safetensors") else out
    table = format_table(["step", "top-1 %", "agreement", "seconds"],
                         [[k, f"{v['top1']:.2f}", f"{v['agreement']:.3f}", f"{v['seconds']:.1f}"]
                          for k, v in steps.items()],
                         title=f"{spec.name}: {params['original']:,} -> {params['converted']:,} parameters")
    write_results(stem, record, f"```\n{table}\n```", command=f"kdna convert {' '.join(args.argv)}")
    print(table)
    print(f"wrote {out} (reload: {reload_hint(kmodel, spec.name)}), {stem}.md, {stem}.json")
    return record


def reload_hint(model: nn.Module, name: str) -> str:
    """How to reload what kdna_fx.save wrote for ``model``: one that kdna_fx.models.create_model built carries
    its ModelSpec (kdna_fx.models.spec_of), which the file keeps, so the path alone rebuilds it; any other
    model needs a fresh instance of its architecture to load into."""
    return "kdna_fx.load(path)" if spec_of(model) is not None else f"kdna_fx.load(path, <fresh {name}>)"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(argv or [])
    run(args)
    return 0
