"""Exceptions and warnings raised by kdna_fx. Every message names the problem and the fix."""
from __future__ import annotations


class KDNAError(Exception):
    """Base class of every kdna_fx error."""


class KDNATraceError(KDNAError):
    """The model could not be traced by torch.fx symbolic tracing.

    Attributes name the innermost module being traced (``module_name``, ``module_type``) and the
    operation that broke tracing (``operation``).
    """

    def __init__(self, message: str, *, module_name: str, module_type: str, operation: str):
        super().__init__(message)
        self.module_name = module_name
        self.module_type = module_type
        self.operation = operation


class GateBatchSizeError(KDNAError, ValueError):
    """A BatchNorm inside an adapter gate was asked to train on a batch of one sample."""


class ConfigError(KDNAError, ValueError):
    """An option value kdna_fx cannot use: in a KDNAConfig or its dict form, a model option, a training option."""


class StateError(KDNAError, ValueError):
    """A saved kdna_fx model does not match the model it is loaded into."""


class NoEligibleConvWarning(UserWarning):
    """transform() found nothing to share; the model is returned unchanged (traced)."""


class SkippedSiteWarning(UserWarning):
    """A pass left a convolution as it was rather than risk a wrong graph."""


class UnwrappedModelWarning(UserWarning):
    """transform() was given a compiled or (Distributed)DataParallel model and used the module inside."""


class KDNATypeError(KDNAError, TypeError):
    """An argument of the wrong type was passed to a kdna_fx function."""
