"""Shared fixtures. The whole suite runs in float32 and float64 with matching tolerances."""
from __future__ import annotations

import ctypes
import gc
import os
import warnings

import pytest

# Inductor's C++ builds in the worker itself, not in a pool of compile processes, when pytest-xdist's workers
# already fill every core: the pool's start-up and contention cost more than its parallelism gives (the compile
# tests, two workers, fresh cache: 160 s with a pool of 2 each, 126 s without). Set before torch reads it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS >= (os.cpu_count() or 1):
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, settings
from torch import nn

import kdna_fx
from kdna_fx.testing import output_tensors

# At most 2 intra-op threads per process, shared among pytest-xdist's workers (make test runs two: one thread each).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))

# Random examples on every run (not derandomised: CI keeps exploring). print_blob makes a failure print the
# @reproduce_failure(...) line that replays it; `pytest --hypothesis-seed=N` replays a whole session.
settings.register_profile("kdna", deadline=None, max_examples=25, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", deadline=None, max_examples=300, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "kdna"))

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


# Garbage is collected by bytes: after any test that leaves this worker GROWTH_BEFORE_COLLECT more resident
# memory than its last full collection did, and the freed heap is handed back to the system (glibc's malloc_trim:
# freed memory otherwise stays in the process). Python's own rule counts objects, not bytes: a transformed or traced
# model is a reference cycle (torch.fx's tracer and GraphModule <-> its graph) that only a full collection frees,
# and in a sweep of large models several 600 M-parameter ones piled up (23 GB, the suite killed for memory on the
# 24 GB machine). Each full collection of a worker costs about 0.35 s (0.6 s before gc.freeze below), and the
# count rule ran about 90 per worker in make test: with this rule beside it, that rule runs rarely.
# 300 MB with the trim against 1 GB without: the sweeps' and chained tools' files in one process peaked at 2.3
# against 3.0 GB, in the same time.
GROWTH_BEFORE_COLLECT = 300_000_000
_last_collection: list[int | None] = [None]


def _trim_heap() -> None:
    """Return the freed heap to the system where the C library can (glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _resident_bytes() -> int | None:
    """This process's resident memory (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what is alive once the tests are collected (torch, the libraries and the test modules live to the
    end: the collector stops scanning them), and where memory can be read, let the byte rule lead."""
    gc.freeze()
    if _resident_bytes() is not None:
        first, second, _ = gc.get_threshold()
        gc.set_threshold(first, second, 100)  # a full collection after 100 middle ones, not 10


@pytest.fixture(autouse=True)
def _collect_garbage_by_memory():
    yield
    resident = _resident_bytes()
    if resident is None:
        return
    if _last_collection[0] is None or resident < _last_collection[0]:
        _last_collection[0] = resident
    elif resident - _last_collection[0] > GROWTH_BEFORE_COLLECT:
        gc.collect()
        _trim_heap()
        _last_collection[0] = _resident_bytes()


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


# ---- test tiers (README, Tests) ------------------------------------------------------------------------------------
# Markers on the tests themselves (pyproject's [tool.pytest.ini_options] lists them), each with its reason beside it:
# make test-fast is the unit tier (`not integration`); make test (CI, and a bare pytest) leaves out `slow`, `sweep`
# and `bench`; make test-all runs everything. A file in one tier says so in its `pytestmark`; the model sweeps mark
# the models outside their default-tier SAMPLE `sweep`; a single slow case is a `pytest.param(..., marks=...)`.


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/*.json from the current code")


def pytest_report_header(config):
    """Which hypothesis profile and seed this session runs with (printed at the top of every run)."""
    seed = config.getoption("--hypothesis-seed", default=None)
    current = settings.default
    how = (f"seed {seed} (--hypothesis-seed)" if seed is not None else
           "derandomized" if current.derandomize else "random seed per test (a failure prints how to replay it)")
    name = settings.get_current_profile_name()
    more = "" if name == "thorough" else "; HYPOTHESIS_PROFILE=thorough for more examples"
    return f"hypothesis profile {name!r}: max_examples={current.max_examples}, {how}{more}"
