"""Training and evaluation for kdna_fx models: ``kdna train`` / ``kdna eval`` and the functions behind them.

    bundle = kdna_fx.train.build_data("fashion-mnist")
    kdna_fx.train.train(model, bundle.train, bundle.val, kdna_fx.train.TrainConfig(epochs=1), "runs/x")
    kdna_fx.train.quick_compare()          # baseline vs KernelDNA, a few minutes on 2 CPU cores

See docs/training.md.
"""
from kdna_fx.errors import CheckpointError, DataError, NonFiniteLossError, WrappedModelError

from .checkpoint import read_checkpoint
from .compare import quick_compare
from kdna_fx.data import DataBundle, build_data, fashion_mnist, read_idx
from .distributed import convert_sync_batchnorm
from .loop import TrainConfig, evaluate, train
from .recipe import WarmupCosine, build_optimizer, param_groups

__all__ = [
    "CheckpointError", "DataBundle", "DataError", "NonFiniteLossError", "TrainConfig", "WarmupCosine",
    "WrappedModelError", "build_data", "build_optimizer", "convert_sync_batchnorm", "evaluate", "fashion_mnist",
    "param_groups", "quick_compare", "read_checkpoint", "read_idx", "train",
]
