"""Options that mean the same in every command (docs/cli.md lists them, tests/test_cli_options.py checks the list):
where the data is, which data set it is, how to build a model, how many images per batch, which file to write."""
from __future__ import annotations

import argparse

from kdna_fx.data import DATASETS, DataSpec


def add_data(p: argparse.ArgumentParser, *, dataset_default: str | None = "fashion-mnist") -> None:
    """``--dataset KIND`` and ``--data PATH`` (always a path), with the image size."""
    p.add_argument("--dataset", choices=DATASETS, default=dataset_default,
                   help="fashion-mnist (IDX files), folder (any ImageFolder tree), imagenet (ImageFolder layout)"
                        + ("" if dataset_default else "; default: the run's, else fashion-mnist"))
    p.add_argument("--data", dest="root", metavar="PATH", default=None,
                   help="data location (default: the run's, or the Fashion-MNIST package "
                        "/usr/share/datasets/fashion-mnist); for folder: an ImageFolder tree")
    p.add_argument("--image-size", type=int, default=None, help="crop size for folder (64) / imagenet (224)")


def data_spec(args: argparse.Namespace, base: DataSpec | None = None, **given: object) -> DataSpec:
    """The data set the options in ``args`` (and ``given``) name, over ``base`` (a run's; default Fashion-MNIST):
    an option left unset keeps ``base``'s value."""
    typed = {name: getattr(args, name, None) for name in DataSpec.__dataclass_fields__}
    return (base or DataSpec()).merged(**{**typed, **given})


def add_model_options(p: argparse.ArgumentParser, *, what: str = "the model", name: bool = True) -> None:
    """``--model`` (unless the command takes the name itself) and the options a model is built with, for sources
    that carry none (state dicts, names)."""
    if name:
        p.add_argument("--model", default=None, help=f"zoo, torchvision/<name> or timm/<name> name of {what} "
                                                     f"(default: the run's or file's own)")
    p.add_argument("--width", type=float, default=None, help="channel width multiplier (state dicts and names)")
    p.add_argument("--small-stem", action="store_true", default=None, help="small stem (state dicts and names)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes (default: the run's or file's, else the data's; plan and export: 1000)")
    p.add_argument("--in-chans", type=int, default=None,
                   help="input channels (default: the run's or file's, else the data's; plan and export: 3)")


def add_batch_size(p: argparse.ArgumentParser, default: int, what: str = "images per batch") -> None:
    p.add_argument("--batch-size", type=int, default=default, help=f"{what} (default {default})")


def add_out(p: argparse.ArgumentParser, what: str, *, required: bool = False) -> None:
    """``--out FILE``: always the one file a command writes (its reports go beside it, as FILE's stem + .md/.json);
    a command that writes a folder takes ``--out-dir``."""
    p.add_argument("--out", metavar="FILE", default=None, required=required, help=what)


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
