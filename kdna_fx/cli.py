"""Command line: ``kdna <command> ...`` (also ``python -m kdna_fx <command> ...``)."""
from __future__ import annotations

import importlib
import sys

# command name -> (module with main(argv), one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("kdna_fx.demo", "the main job: ResNet-18 transform, report, fold/compile checks and timing, "
                              "then a brief Fashion-MNIST comparison with the baseline"),
    "plan": ("kdna_fx.inspect", "print the family plan of a torchvision model without changing it"),
    "train": ("kdna_fx.train.train_command",
              "train a kdna_fx.models model (Fashion-MNIST, ImageFolder, ImageNet; DDP)"),
    "eval": ("kdna_fx.train.eval_command", "top-1 and images/s of a kdna train checkpoint"),
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
    module, _ = COMMANDS[argv[0]]
    result = importlib.import_module(module).main(argv[1:])
    return int(result or 0)
