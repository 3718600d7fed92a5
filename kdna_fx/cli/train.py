"""``kdna train`` and ``kdna eval``: the command-line front ends of kdna_fx.train.

They report user errors by raising KDNAError subclasses; kdna_fx.cli.main prints those and sets the exit code.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from kdna_fx.data import DataSpec
from kdna_fx.errors import ConfigError
from kdna_fx.datamodel import converted_by
from kdna_fx.models import TAGS, ModelSpec
from kdna_fx.source import is_kdna_file, model_spec, resolve_source, run_source
from kdna_fx.spec import ZOO_DEFAULTS
from kdna_fx.timing import provenance
from kdna_fx.train import distributed as D
from kdna_fx.train.checkpoint import CHECKPOINT_NAME, read_checkpoint
from kdna_fx.train.loop import TrainConfig, evaluate, make_eval_loader, train
from kdna_fx.train.recipe import AMP_CHOICES, resolve_amp
from kdna_fx.utils import write_json

from .options import add_batch_size, add_data, add_model_options, add_out, add_progress, data_spec

# Options that may differ from the checkpoint's when resuming (they do not change the numbers).
_RESUME_OVERRIDABLE = {"workers", "device", "log_every", "progress", "compile", "root"}


def _add_data_options(p: argparse.ArgumentParser) -> None:
    add_data(p)
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of a single folder tree")
    p.add_argument("--train-subset", type=int, default=None, help="train on a seeded random subset of N images")
    p.add_argument("--val-subset", type=int, default=None, help="evaluate on a seeded random subset of N images")
    p.add_argument("--workers", type=int, default=None, help="data-loader processes (0 for fashion-mnist, else 8)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                   help="autocast: auto = bf16 (or fp16) on CUDA, fp32 on CPU; bf16 on CPU is opt-in")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convs on GPU)")
    add_progress(p)


def train_parser(suppress: bool = False) -> argparse.ArgumentParser:
    """The ``kdna train`` parser; ``suppress`` leaves out unset options (to see what the user typed)."""
    p = argparse.ArgumentParser(prog="kdna train", description="Train a kdna_fx.models model; see docs/training.md",
                                argument_default=argparse.SUPPRESS if suppress else None)
    p.add_argument("--model", default="kdna_resnet18", help="a kdna_fx.models name (kdna_fx.models.list_models())")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    p.add_argument("--small-stem", action="store_true", default=None,
                   help="3x3 stride-1 stem without max-pool (small images); default on for fashion-mnist")
    p.add_argument("--gate-norm", choices=("batch", "layer", "none"), default=None,
                   help="norm inside KernelDNA gates (default: the model's, batch)")
    p.add_argument("--run-dir", default=None, help="where checkpoints and metrics go (default runs/<model>_<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last.pt")
    _add_data_options(p)
    d = TrainConfig()
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process (global = x processes)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=d.optimizer)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.1 SGD, 1e-3 AdamW)")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="conv/linear weights (default 1e-4 SGD, 0.05 AdamW)")
    p.add_argument("--adapter-weight-decay", type=float, default=d.adapter_weight_decay,
                   help="filter_scale, spatial_scale and gate weights (default 0: not decayed)")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--min-lr", type=float, default=d.min_lr)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--compile", action="store_true", help="torch.compile the (DDP-wrapped) model")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP, gate norms included (CUDA)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--limit-steps", type=int, default=None, help="at most N steps per epoch (smoke runs)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between progress/NaN checks")
    if suppress:
        for action in p._actions:
            action.default = argparse.SUPPRESS
    return p


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    fmnist = args.dataset == "fashion-mnist"
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        nesterov=args.nesterov, weight_decay=args.weight_decay, adapter_weight_decay=args.adapter_weight_decay,
        warmup_epochs=args.warmup_epochs, min_lr=args.min_lr, label_smoothing=args.label_smoothing, amp=args.amp,
        channels_last=args.channels_last, compile=args.compile, sync_bn=args.sync_bn, seed=args.seed,
        workers=(0 if fmnist else min(8, os.cpu_count() or 1)) if args.workers is None else args.workers,
        device=args.device, limit_steps=args.limit_steps, log_every=args.log_every, progress=args.progress,
        data=data_spec(args).to_dict())
    return config


def _resume_config(run_dir: str, given: dict[str, Any]) -> TrainConfig:
    """The checkpoint's config, with the options typed on this command line that may change on resume."""
    saved = read_checkpoint(os.path.join(run_dir, CHECKPOINT_NAME))["config"]
    spec = ModelSpec.from_dict(saved["model"])
    flat_saved = {**saved, **DataSpec.from_dict(saved["data"]).to_dict(), **ZOO_DEFAULTS, **spec.kwargs,
                  "model": spec.name}
    conflicts = []
    for key, value in given.items():
        if key in ("resume", "run_dir") or key in _RESUME_OVERRIDABLE:
            continue
        old = flat_saved.get(key, value)
        if old != value:
            conflicts.append(f"--{key.replace('_', '-')} {value!r} (the run used {old!r})")
    if conflicts:
        raise ConfigError(f"--resume continues the run with its own options; these differ: {'; '.join(conflicts)}. "
                        f"Drop them to resume exactly, or start a new --run-dir.")
    config = TrainConfig(**saved)
    for key in _RESUME_OVERRIDABLE & set(given):
        if key == "root":
            config.data = DataSpec.from_dict(config.data).merged(root=given[key]).to_dict()
        else:
            setattr(config, key, given[key])
    return config


def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    given = vars(train_parser(suppress=True).parse_args(argv))
    run_dir = args.run_dir or os.path.join("runs", f"{args.model}_{args.dataset}")
    config = _resume_config(run_dir, given) if args.resume else _config_from_args(args)
    data = DataSpec.from_dict(config.data).build(config.seed)
    if not args.resume:  # a resumed run keeps the spec it stored, in whatever form an older kdna_fx wrote it
        small_stem = args.dataset == "fashion-mnist" if args.small_stem is None else True
        config.model = model_spec(args.model, width=args.width, small_stem=small_stem, gate_norm=args.gate_norm,
                                  num_classes=data.num_classes, in_chans=data.in_chans).to_dict()
    spec = ModelSpec.from_dict(config.model)
    torch.manual_seed(config.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = spec.build()
    if int(os.environ.get("RANK", "0")) == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"kdna train: {spec.name} ({params:,} parameters) on {data.description}: "
              f"{len(data.train)} train / {len(data.val)} val images -> {run_dir}", flush=True)
    result = train(model, data.train, data.val, config, run_dir, resume=args.resume)
    final = result["final"]
    if int(os.environ.get("RANK", "0")) == 0 and final:
        print(f"done: val top-1 {final.get('val_top1', float('nan')):.2f}% after {final['epoch']} epochs; "
              f"checkpoint {result['checkpoint']}")
    return 0


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdna eval", description="Top-1 and images/s of a `kdna train` checkpoint, of a "
                                                             "kdna_fx.save file, or of a state dict with --model")
    p.add_argument("checkpoint", help="a last.pt written by kdna train, its run directory, a kdna_fx.save file "
                                      "(kdna convert's output, or any model create_model built), or a state dict "
                                      "(.pt / .safetensors) with --model and its options, or a model name (random "
                                      "weights)")
    add_model_options(p, what="a state dict's architecture")
    add_batch_size(p, 256)
    add_out(p, "also write the result to this JSON file")
    _add_data_options(p)
    for action in p._actions:  # data options default to what the run was trained on
        if action.dest in ("dataset", "image_size", "val_fraction", "val_subset", "amp"):
            action.default = None
    return p


def eval_main(argv: list[str] | None = None) -> int:
    args = eval_parser().parse_args(argv)
    where = args.checkpoint
    if args.model is None and os.path.isfile(where) and not is_kdna_file(where):  # a checkpoint file (last.pt)
        source = run_source(where)
    else:  # a run directory, a kdna_fx.save file, or a state dict with --model, as convert, cka and export take
        source = resolve_source(where, args.model, width=args.width, small_stem=args.small_stem,
                                num_classes=args.num_classes)
    run = source.checkpoint or {"epoch": None, "config": {"seed": 0}}
    data_set = data_spec(args, source.data)
    data = data_set.build(run["config"]["seed"])
    model = source.fit(num_classes=data.num_classes, in_chans=args.in_chans or data.in_chans).build()
    ctx = D.setup(args.device)
    model.to(ctx.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    workers = (0 if data_set.dataset == "fashion-mnist" else 8) if args.workers is None else args.workers
    loader = make_eval_loader(data.val, args.batch_size, workers, ctx)
    amp_dtype = resolve_amp(args.amp or run["config"].get("amp", "auto"), ctx.device)
    result = evaluate(model, loader, device=ctx.device, amp_dtype=amp_dtype, channels_last=args.channels_last,
                      ctx=ctx, progress=args.progress)
    D.cleanup(ctx)
    name = source.spec.name
    by = converted_by(model) if source.checkpoint is None else None  # a file, not a run (trained as it is)
    if by and TAGS.get(name.rpartition(".")[2], TAGS["plain"]) == TAGS["plain"]:  # a file of a plain network's
        name += f", converted by {by}"  # conversion (kdna convert) is named as converted, not as its original
    result.update({"checkpoint": where, "model": name, "epoch": run["epoch"],
                   "data": data.description, "device": str(ctx.device), "batch_size": args.batch_size})
    if ctx.is_main:
        epoch = f" (epoch {result['epoch']})" if result["epoch"] is not None else ""
        print(f"{result['model']}{epoch} on {data.description}: top-1 {result['top1']:.2f}% "
              f"over {result['images']} images, loss {result['loss']:.4f}, {result['images_per_s']:.0f} images/s "
              f"(batch {args.batch_size}, {ctx.device}, {torch.get_num_threads()} threads)")
        if args.out:
            write_json(args.out, {**result, "provenance": provenance()})
    return 0
