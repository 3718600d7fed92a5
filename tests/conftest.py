"""The suite's settings and hooks: Inductor's compile threads, hypothesis profiles, garbage collection by memory,
the tiers. The fixtures that need torch (dtypes and tolerances, the sweeps' checks) are tests/fixtures.py,
registered where tests run. The whole suite runs in float32 and float64 with matching tolerances."""
from __future__ import annotations

import ctypes
import gc
import os

import pytest

# Inductor's C++ builds in the worker itself, not in a pool of compile processes, when pytest-xdist's workers
# already fill every core: the pool's start-up and contention cost more than its parallelism gives (the compile
# tests, two workers, fresh cache: 160 s with a pool of 2 each, 126 s without). Set before torch reads it.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS >= (os.cpu_count() or 1):
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# Random examples on every run (not derandomised: CI keeps exploring). print_blob makes a failure print the
# @reproduce_failure(...) line that replays it; `pytest --hypothesis-seed=N` replays a whole session.
settings.register_profile("kdna", deadline=None, max_examples=25, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", deadline=None, max_examples=300, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "kdna"))

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


def _runs_tests(config: pytest.Config) -> bool:
    """False in pytest-xdist's controller (it hands tests to the workers and runs none)."""
    return hasattr(config, "workerinput") or not config.getoption("numprocesses", None)


def pytest_configure(config: pytest.Config) -> None:
    """Register tests/fixtures.py (torch, kdna_fx) where tests run."""
    if _runs_tests(config):
        from . import fixtures

        config.pluginmanager.register(fixtures, "kdna_fx_test_fixtures")


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
