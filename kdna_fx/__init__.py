"""kdna_fx: KernelDNA (dynamic kernel sharing through light adapters) for any PyTorch CNN.

    kmodel = kdna_fx.transform(model)      # FX rewrite: same-shaped 3x3 convs share one parent kernel
    print(kdna_fx.report(kmodel))          # families, skipped convs, params and MACs before/after
    fast = torch.compile(kmodel)           # Inductor, fullgraph
    deploy = kdna_fx.fold(kmodel.eval())   # static modulation folded for inference

The names below are the whole public face (README.md, API). The rooms behind it: ``kdna_fx.functional`` (the
adapter math), ``kdna_fx.passes`` (the graph passes), ``kdna_fx.datamodel`` (the types they exchange),
``kdna_fx.models`` (the zoo), ``kdna_fx.peers`` (the dynamic-convolution peers), ``kdna_fx.cka``,
``kdna_fx.train``, ``kdna_fx.data`` and ``kdna_fx.testing``.
"""
from .api import as_function, fold, load_original, plan, plan_of, transform
from .calibration import CalibrationConfig, calibrate
from .config import AdapterConfig, KDNAConfig
from .conversion import convert
from .exporting import export
from .datamodel import Family, Plan
from .errors import (CalibrationError, CheckpointError, CKAError, ChildWeightError, CompiledGradientWarning, ConfigError,
                     DataError, ExportError, GateBatchSizeError, KDNAError, KDNATraceError, KDNATypeError, NoEligibleConvWarning,
                     NonFiniteLossError, ParentKernelError, SkippedSiteWarning, StateError, UnwrappedModelWarning,
                     WrappedModelError)
from .registry import register_not_traced
from .reporting import report
from .state import load, save

from . import models  # noqa: E402,F401  (the zoo: kdna_fx.models.create_model)
from . import peers  # noqa: E402,F401  (CondConv, DY-Conv, ODConv as conversions, for comparison)

__version__ = "0.1.0"

__all__ = [
    # phases
    "plan", "transform", "fold", "as_function", "calibrate", "convert", "report", "save", "load", "load_original", "plan_of",
    "export",
    # configuration and data
    "KDNAConfig", "AdapterConfig", "CalibrationConfig", "Plan", "Family", "register_not_traced",
    # errors and warnings
    "KDNAError", "ConfigError", "KDNATypeError", "KDNATraceError", "StateError", "GateBatchSizeError",
    "ChildWeightError", "CalibrationError", "CheckpointError", "CKAError", "DataError", "ExportError", "NonFiniteLossError", "WrappedModelError",
    "ParentKernelError",
    "NoEligibleConvWarning", "SkippedSiteWarning", "UnwrappedModelWarning",
    "CompiledGradientWarning",
]
