"""The fixtures that need torch: dtypes and their tolerances, one intra-op thread, the model sweeps' checks.

A plugin that tests/conftest.py registers in the processes that run tests, not in pytest-xdist's controller, which
only hands tests out: importing torch and kdna_fx there held 0.5 GB for nothing.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import kdna_fx
from kdna_fx.testing import output_tensors

from .conftest import WORKERS

# At most 2 intra-op threads per process, shared among pytest-xdist's workers (make test runs two: one thread each).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // WORKERS))

# rtol/atol per dtype: float64 proves the algebra, float32 shows the tolerance users will see.
TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}


@pytest.fixture(params=[torch.float32, torch.float64], ids=["fp32", "fp64"])
def dtype(request):
    """Runs the test once per dtype with that dtype as torch's default (models are built in it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: on a shared 2-core machine two threads only fight."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ModelSweep:
    """What the three model sweeps (torchvision classifiers, timm families, dense prediction) ask of each model:
    shared (finite gradients, fewer parameters) or listed as unchanged with its reason. A model whose outcome
    changes fails in either direction, so the lists stay true."""

    @staticmethod
    def transform(model: nn.Module) -> tuple[nn.Module, bool]:
        """kdna_fx.transform(model), and whether it left the model unchanged (NoEligibleConvWarning)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kmodel = kdna_fx.transform(model)
        ModelSweep.keeps_its_class(model, kmodel)
        return kmodel, any(issubclass(w.category, kdna_fx.NoEligibleConvWarning) for w in caught)

    @staticmethod
    def keeps_its_class(model: nn.Module, kmodel: nn.Module) -> None:
        """The transformed model is the user's model (issue 31): its class, and every public name of it."""
        assert type(kmodel) is type(model), f"{type(kmodel).__name__} is not the user's {type(model).__name__}"
        missing = [n for n in dir(type(model)) if not n.startswith("_") and n not in dir(kmodel)]
        assert not missing, f"the transformed {type(model).__name__} lost {missing}"

    @staticmethod
    def check(name: str, model: nn.Module, kmodel: nn.Module, unchanged: bool, listed: dict[str, str]) -> None:
        """After a backward pass through ``kmodel``: finite gradients, and the outcome ``listed`` promises."""
        grads = [p.grad for p in kmodel.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        before, after = (sum(p.numel() for p in m.parameters()) for m in (model, kmodel))
        if name in listed:
            assert unchanged, f"{name} is listed as unchanged ({listed[name]}) but kdna_fx now shares it"
            assert after == before
        else:
            assert not unchanged, f"{name}: kdna_fx found nothing to share; list it in UNCHANGED with a reason"
            assert after < before


    @staticmethod
    def reloads(kmodel: nn.Module, x: object, folder, **kwargs: object) -> None:
        """kdna_fx.save then kdna_fx.load(path), with no model given (the file records how its model was built:
        build it with kdna_fx.models.create_model), computes bit for bit what ``kmodel`` computes on ``x`` (and
        ``kwargs``), in eval mode: every output tensor, for models that return dicts or lists too."""
        path = folder / "model.safetensors"
        kdna_fx.save(kmodel, path)
        with warnings.catch_warnings():
            # a model listed as unchanged says so again as it reloads: the sweep checked that warning already
            warnings.simplefilter("ignore", kdna_fx.NoEligibleConvWarning)
            again = kdna_fx.load(path)
        with torch.no_grad():
            ours, theirs = (output_tensors(m.eval()(x, **kwargs)) for m in (again, kmodel))
        assert ours and len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.fixture
def model_sweep() -> ModelSweep:
    return ModelSweep()


@pytest.fixture
def tol(dtype):
    return TOLERANCES[dtype]
