"""Command line: ``kdna <command> ...`` (also ``python -m kdna_fx <command> ...``), one module per command.

Each command is a thin layer over a library call; the options they share mean the same everywhere
(kdna_fx/cli/options.py: ``--data`` is always a path, ``--dataset`` the kind of data set).

Every command reports a user error by raising a KDNAError; ``main`` prints it as ``kdna <command>: error: ...``
and exits with the error's ``exit_code`` (2 unless the class says otherwise: NonFiniteLossError is 3). Any
other exception is a bug in kdna_fx and keeps its traceback.
"""
from __future__ import annotations

import importlib
import sys

from kdna_fx.errors import KDNAError

# command name -> ("module:function" taking argv, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("kdna_fx.cli.demo:main", "what KernelDNA buys on ResNet-18: parameters, file sizes and compiled speed "
                                  "beside the original, then the frontier study's accuracy at equal parameters"),
    "plan": ("kdna_fx.cli.plan:main", "print the family plan kdna_fx would build for a model, changing nothing"),
    "models": ("kdna_fx.cli.models:main", "parameters and MACs of the zoo's models"),
    "train": ("kdna_fx.cli.train:train_main",
              "train a kdna_fx.models model (Fashion-MNIST, ImageFolder, ImageNet; DDP)"),
    "eval": ("kdna_fx.cli.train:eval_main", "top-1 and images/s of a kdna train checkpoint"),
    "convert": ("kdna_fx.cli.convert:main", "convert a trained model (run directory or state dict) into a "
                                               "KernelDNA model, calibrated without labels"),
    "cka": ("kdna_fx.cli.cka:main", "linear CKA between a model's conv outputs: heat map (PNG), matrix (JSON) "
                                       "and the most similar pairs; --compare draws a second model beside it"),
    "export": ("kdna_fx.cli.export:main", "a deploy file (ONNX or pt2, the shared form by default), checked against "
                                             "eager before it is written"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"kdna: unknown command {argv[0]!r}\n", file=sys.stderr)
        print("usage: kdna <command> [options]   (kdna <command> --help for its options)\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:8s} {text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    command = argv[0]
    module, function = COMMANDS[command][0].split(":")
    run = getattr(importlib.import_module(module), function)
    try:
        return int(run(argv[1:]) or 0)
    except KDNAError as exc:
        print(f"kdna {command}: error: {_own_message(exc)}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))


def _own_message(exc: KDNAError) -> str:
    """The error's message. torch's DataLoader raises an error from a worker process again as the same class with
    the worker's whole traceback as its message; the error's own message is that traceback's last line."""
    message = str(exc)
    if "\nOriginal Traceback" not in message:
        return message
    return message.strip().splitlines()[-1].removeprefix(f"{type(exc).__module__}.{type(exc).__qualname__}: ")
