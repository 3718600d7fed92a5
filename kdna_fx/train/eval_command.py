"""`kdna eval` entry point (see kdna_fx.train.commands)."""
from .commands import eval_main as main

__all__ = ["main"]
