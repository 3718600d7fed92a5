"""Exceptions and warnings raised by kdna_fx. Every message names the problem and the fix."""
from __future__ import annotations


class KDNAError(Exception):
    """Base class of every kdna_fx error."""


class KDNATraceError(KDNAError):
    """The model could not be traced by torch.fx symbolic tracing.

    Attributes name the innermost module being traced (``module_name``, ``module_type``), the
    operation that broke tracing (``operation``) and where, in the model's own code (``source``:
    ``"path/to/model.py:42 `if x.sum() > 0:`"``, or "" when no line of it was running).
    """

    def __init__(self, message: str, *, module_name: str, module_type: str, operation: str, source: str = ""):
        super().__init__(message)
        self.module_name = module_name
        self.module_type = module_type
        self.operation = operation
        self.source = source


class GateBatchSizeError(KDNAError, ValueError):
    """A BatchNorm inside an adapter gate was asked to train on a batch of one sample."""


class ConfigError(KDNAError, ValueError):
    """An option value kdna_fx cannot use: in a KDNAConfig or its dict form, a model option, a training option."""


class ChildWeightError(KDNAError, AttributeError):
    """Code read ``.weight`` of a KernelDNA child, which has no kernel of its own (its gate scales each sample's
    input, so no single kernel computes it). An AttributeError too, so ``hasattr(child, "weight")`` is False."""


class ParentKernelError(KDNAError, RuntimeError):
    """A tool traced or rewrote the kernel a KernelDNA child reuses from its parent conv (conv-BN fusion,
    torch.ao quantization, a kernel hook); the message says how to apply it safely."""


class StateError(KDNAError, ValueError):
    """A saved kdna_fx model does not match the model it is loaded into."""


class NoEligibleConvWarning(UserWarning):
    """transform() found nothing to share; the model is returned unchanged."""


class SkippedSiteWarning(UserWarning):
    """A pass left a convolution as it was rather than risk a wrong graph."""


class CompiledGradientWarning(UserWarning):
    """A compiled training step gave other gradients than eager (kdna_fx.testing.check_compiled_gradients); the
    training fell back to another backend, or to eager, as the warning says."""


class UnwrappedModelWarning(UserWarning):
    """transform() was given a compiled or (Distributed)DataParallel model and used the module inside."""


class KDNATypeError(KDNAError, TypeError):
    """An argument of the wrong type was passed to a kdna_fx function."""


class CalibrationError(KDNAError, ValueError):
    """calibrate() cannot use its data, its reference or its model as given."""


class CheckpointError(KDNAError, ValueError):
    """A checkpoint is missing, unreadable or does not belong to the model/run it is loaded into."""


class DataError(KDNAError, ValueError):
    """A data set is missing or does not have the expected layout; the message says how to fix it."""


class NonFiniteLossError(KDNAError, RuntimeError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint was kept."""

    exit_code = 3
    """What `kdna train` exits with (2 for every other KDNAError), so scripts can tell divergence apart."""


class WrappedModelError(KDNATypeError):
    """train() was given a DDP-wrapped or compiled model; it wraps and compiles the plain model itself."""


class CKAError(KDNAError, ValueError):
    """Inputs CKA cannot be computed on (shapes, too few examples, constant features); the message says why."""


class ExportError(KDNAError, RuntimeError):
    """A model did not export (kdna_fx.export, ``kdna export``), or its exported file does not agree with it."""
