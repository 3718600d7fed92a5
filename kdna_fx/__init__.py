"""kdna_fx: KernelDNA (dynamic kernel sharing through light adapters) for any PyTorch CNN.

    kmodel = kdna_fx.transform(model)      # FX rewrite: same-shaped 3x3 convs share one parent kernel
    print(kdna_fx.report(kmodel))          # families, skipped convs, params and MACs before/after
    fast = torch.compile(kmodel)           # Inductor, fullgraph
    deploy = kdna_fx.fold(kmodel.eval())   # static modulation folded for inference
"""
from . import functional, passes, registry
from .adapters import ChildAdapter, Gate
from .api import as_function, fold, load_original, plan, plan_of, transform
from .calibration import CalibrationConfig, CalibrationError, CalibrationReport, calibrate
from .config import AdapterConfig, KDNAConfig
from .conversion import ConversionResult, convert
from .errors import (ChildWeightError, CompiledGradientWarning, ConfigError, GateBatchSizeError, KDNAError,
                     KDNATraceError, KDNATypeError, NoEligibleConvWarning, PartialTraceWarning, SkippedSiteWarning,
                     StateError, UnwrappedModelWarning)
from .passes import Family, Plan
from .registry import register_not_traced
from .reporting import Report, report
from .state import load, save

from . import models  # noqa: E402  (the zoo builds on everything above)
from . import peers  # noqa: E402  (CondConv, DY-Conv, ODConv as transforms, for comparison)

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "CalibrationConfig", "CalibrationError", "CalibrationReport", "ChildAdapter", "ChildWeightError", "CompiledGradientWarning",
    "ConfigError",
    "Family", "Gate", "GateBatchSizeError", "KDNAConfig", "KDNAError", "KDNATraceError", "KDNATypeError",
    "NoEligibleConvWarning", "PartialTraceWarning", "Plan", "Report", "SkippedSiteWarning", "StateError",
    "UnwrappedModelWarning", "as_function", "calibrate", "ConversionResult", "convert", "fold", "functional", "load", "load_original", "models",
    "passes", "peers", "plan", "plan_of", "register_not_traced", "report", "save", "transform",
]
