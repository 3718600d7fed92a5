# Set-up and entry points. `make demo` and `make test` each do the whole set-up on a fresh machine.
PY := .venv/bin/python
STAMP := .venv/.installed-stamp

.PHONY: demo test test-fast test-all test-slow bench gpu-check data clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m pip install -q --no-deps 'ultralytics>=8.4,<8.5'  # its requirements are in the test extra (pyproject)
	touch $(STAMP)

# Fashion-MNIST, the embedded default data set (IDX files under /usr/share/datasets/fashion-mnist).
data:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }

demo: $(STAMP) data
	$(PY) -m kdna_fx demo

# Two pytest-xdist workers (the 2-core machine); loadgroup keeps a file marked xdist_group on one worker.
XDIST := -n 2 --dist loadgroup

test: $(STAMP) data
	$(PY) -m pytest -q $(XDIST)

# Tiers (markers on the tests, tests/conftest.py; README "Tests"): test-fast is the edit loop (unit tests only);
# test is CI's; test-all adds the full model sweeps, the bench smoke runs and the slow checks.
test-fast: $(STAMP) data
	$(PY) -m pytest -q -x $(XDIST) -m "not slow and not sweep and not bench and not integration"

test-all: $(STAMP) data
	$(PY) -m pytest -q $(XDIST) -m ""

test-slow: $(STAMP) data
	$(PY) -m pytest -q $(XDIST) -m slow

bench: $(STAMP) data
	$(PY) -m bench.speed

# On a lent GPU machine (bench/gpu_check.py): its own python3 holds torch and nothing can be fetched there, so
# kdna_fx alone is installed, without dependencies, into a temporary folder. Writes bench/results/gpu/.
# Rehearse it here with: make gpu-check GPU_PY=.venv/bin/python GPU_CHECK_ARGS=--dry-run
GPU_PY ?= python3
GPU_CHECK_ARGS ?=
gpu-check:
	rm -rf /tmp/kdna_fx_site && $(GPU_PY) -m pip install -q --no-deps --no-build-isolation --target /tmp/kdna_fx_site .
	PYTHONPATH=/tmp/kdna_fx_site PYTHONUNBUFFERED=1 $(GPU_PY) -P bench/gpu_check.py $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf .venv
