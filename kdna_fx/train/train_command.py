"""`kdna train` entry point (see kdna_fx.train.commands)."""
from .commands import train_main as main

__all__ = ["main"]
