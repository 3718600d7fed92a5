"""``kdna export SOURCE --format onnx|pt2 --out PATH``: a checked deploy file (ONNX or pt2) of a model.

SOURCE is a ``kdna train`` run directory, a state-dict file (.pt / .safetensors, with --model and its options), a
file written by kdna_fx.save / ``kdna convert`` (with --model: the original architecture), or a model name
(kdna_fx.models or torchvision; random weights seeded by --seed). The model is exported in its shared form (each
parent kernel once: about the size of its kdna_fx.save file), reloaded (onnxruntime for ONNX, torch.export.load
for pt2) and compared with eager; the file appears at --out only when it agrees (kdna_fx.export,
docs/deployment.md). The input size is --image-size / --in-chans, else the run's data, else what the model's
ModelSpec records, else 224 x 224 with 3 channels; the command says which it used.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from typing import Any

from torch import nn


from kdna_fx.errors import ConfigError
from kdna_fx.exporting import FORMATS, TOLERANCE, ExportReport, export
from kdna_fx.data import DataSpec
from kdna_fx.models import spec_of
from kdna_fx.source import resolve_source, saved_spec

from .options import add_model_options

# Sources that carry no options of their own (a name, a weights file) are built in the zoo's ImageNet form
# unless told otherwise: what create_model(name) builds.
DEFAULT_CLASSES, DEFAULT_CHANNELS, DEFAULT_IMAGE_SIZE = 1000, 3, 224


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdna export", description=__doc__.splitlines()[0],
                                epilog="The shared form keeps the method's parameter saving in the file (about the "
                                       "kdna_fx.save file's size; the folded one is about twice that). onnxruntime "
                                       "folds its kernels when the session starts (seconds longer to load) and then "
                                       "runs it at the folded file's speed; a pt2 file compiled with Inductor freezing "
                                       "measured 2-18 % slower shared than folded on a noisy machine, and one run "
                                       "without compiling computes the kernels on every call: --fold for those "
                                       "(bench/results/export/deploy_forms.md, docs/deployment.md).")
    p.add_argument("source", help="a `kdna train` run directory, a state dict (.pt / .safetensors), a kdna_fx.save "
                                  "file, or a model name (random weights)")
    p.add_argument("--format", required=True, help=f"file format: {' or '.join(FORMATS)}")
    p.add_argument("--out", required=True, help="the file to write (written only once it agrees with eager)")
    p.add_argument("--fold", action="store_true",
                   help="export the folded form (kdna_fx.fold: a kernel per child, about twice the file) instead of "
                        "the shared form (default; see below)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="a file for every batch size (checked at each --batch-size); default: one batch size")
    p.add_argument("--batch-size", type=int, nargs="+", default=None,
                   help="batch size(s) the file is checked at: with --dynamic-batch default 1 7; without it, the "
                        "one batch size the file is made for, default 1")
    p.add_argument("--opset", type=int, default=None, help="ONNX operator set (default: the exporter's)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help="largest accepted max |y - eager| / max |eager| (default %(default)g)")
    add_model_options(p, what="the architecture")
    p.add_argument("--image-size", type=int, default=None,
                   help=f"input height and width (default: the run's, else the ModelSpec's, else "
                        f"{DEFAULT_IMAGE_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="the weights of a model given by name, and the check's inputs")
    return p


def _first_conv_channels(model: nn.Module) -> int:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ConfigError("cannot tell the model's input channels (it has no nn.Conv2d): pass --in-chans")
    return conv.in_channels


def _image_size(data: DataSpec) -> int | None:
    """The image size a run trained at (kdna_fx.data's defaults where the run left it open)."""
    return data.image_size or {"fashion-mnist": 28, "imagenet": 224, "folder": 64}.get(data.dataset)


def _pick(given: int | None, flag: str, recorded: int | None, where: str, default: int,
          otherwise: str) -> tuple[int, str]:
    """The value to use and where it came from: the option given, else the one recorded, else the default."""
    if given:
        return given, flag
    return (recorded, where) if recorded else (default, otherwise)


def source_model(args: argparse.Namespace) -> tuple[nn.Module, tuple[int, int, int], dict[str, Any] | None, str]:
    """(model, input shape without the batch, model spec or None, where the input shape came from) of SOURCE."""
    source = resolve_source(args.source, args.model, width=args.width, small_stem=args.small_stem,
                            num_classes=args.num_classes)
    in_file = saved_spec(args.source) if source.saved else None  # a kdna_fx.save file's spec records its input
    # a run's or a self-describing file's spec is complete; names and state dicts get the ImageNet form
    source = source.fit(num_classes=args.num_classes or DEFAULT_CLASSES,
                        in_chans=args.in_chans or (in_file and in_file.in_chans) or DEFAULT_CHANNELS)
    model = source.build(args.seed)
    if source.checkpoint:
        recorded = source.spec.kwargs.get("in_chans"), _image_size(source.data)
    else:
        known = in_file if source.saved else spec_of(model)
        recorded = (known.in_chans, known.image_size) if known else (None, None)
    where = "the run's" if source.checkpoint else "the ModelSpec's"
    fallback = (_first_conv_channels(model), "the first conv's") if source.own and source.saved else \
        (DEFAULT_CHANNELS, "default")
    channels, channels_from = _pick(args.in_chans, "--in-chans", recorded[0], where, *fallback)
    size, size_from = _pick(args.image_size, "--image-size", recorded[1], where, DEFAULT_IMAGE_SIZE,
                            "not recorded: the default, pass --image-size for another")
    origin = f"channels: {channels_from}; image size: {size_from}"
    return model, (int(channels), size, size), source.spec.to_dict(), origin


def run_export(args: argparse.Namespace) -> ExportReport:
    if args.format not in FORMATS:  # before building the model: the cheap mistake first
        raise ConfigError(f"unknown --format {args.format!r}: use {' or '.join(FORMATS)}")
    model, shape, spec, origin = source_model(args)
    # torch.export and torch.onnx print graphs and warnings on their way to an error; the error's one line says
    # why, so their output is shown only when the export succeeds.
    torch_output = io.StringIO()
    with contextlib.redirect_stderr(torch_output):
        report = export(model, args.out, input_shape=shape, format=args.format, fold=args.fold,
                        dynamic_batch=args.dynamic_batch, opset=args.opset, check_batches=args.batch_size,
                        tolerance=args.tolerance, seed=args.seed)
    sys.stderr.write(torch_output.getvalue())
    print(report)
    print(f"input {'x'.join(map(str, shape))} ({origin})")
    if spec is not None:
        print(f"model: {json.dumps(spec)}")
    print(f"wrote {os.path.abspath(report.path)}")
    return report


def main(argv: list[str] | None = None) -> int:
    run_export(parser().parse_args(argv))
    return 0
