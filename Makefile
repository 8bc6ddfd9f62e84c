# convc developer tasks. Needs only Python 3.10+ and make: every target that
# runs Python first makes the virtual environment $(VENV) if it is missing or
# older than pyproject.toml / constraints.txt.
#
#   make demo     train the seed model on synthetic data, write $(DEMO_OUT)/
#   make test     run the test suite, then its core again with poisoned buffers
#   make help     list every target

VENV ?= .venv
PYTHON ?= python3

# Optional test oracle; `make TORCH_SPEC=` skips it.
TORCH_SPEC ?= torch==2.13.0
CHAINER_SPEC ?= chainer==7.8.1
# convc.jax (docs/jax.md); `make JAX_SPEC=` leaves it out
JAX_SPEC ?= jax[cpu]>=0.4.30

DEMO_SPEC ?= examples/seed.cell
DEMO_OUT ?= demo_out
DEMO_ARGS ?=
PYTEST_ARGS ?=

VPY := $(VENV)/bin/python
# The stamp is newer than the files the install depends on once the install
# has finished; while it is, `make` calls no pip at all.
STAMP := $(VENV)/.convc-installed
CONSTRAINTS := $(abspath constraints.txt)

.DEFAULT_GOAL := help
.PHONY: help venv test demo fuzz bench quality clean distclean

help:
	@echo "convc make targets:"
	@echo "  make venv       create $(VENV) and install convc[dev], Chainer, torch and oneDNN"
	@echo "  make test       run the tests, then the core ones with --poison (PYTEST_ARGS='-k conv' to select)"
	@echo "  make demo       train $(DEMO_SPEC) on synthetic data into $(DEMO_OUT)/ (DEMO_ARGS=...)"
	@echo "  make fuzz       run the long hypothesis fuzz profile"
	@echo "  make bench      run the benchmarks (convc bench)"
	@echo "  make quality    train shi2015_small for QUALITY_MINUTES (15) and write bench/QUALITY.md"
	@echo "  make clean      remove build artefacts and caches (keeps $(VENV))"
	@echo "  make distclean  clean, and remove $(VENV) too"
	@echo "Variables: VENV=$(VENV) PYTHON=$(PYTHON) TORCH_SPEC=$(TORCH_SPEC)"

venv: $(STAMP)

# Chainer 7.8.1 ships only an sdist whose setup.py needs a setuptools older than
# 82 in its build environment. pip >= 25.3 passes constraints into that isolated
# environment only through PIP_BUILD_CONSTRAINT, older pips through
# PIP_CONSTRAINT, so both point at constraints.txt. setuptools and wheel are
# installed into the venv itself so that `python -m build --no-isolation`
# (tests/test_packaging.py) works; the same cap keeps pkg_resources, which
# Chainer imports at run time.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
	  { echo "error: convc needs Python 3.10 or newer; $(PYTHON) is older (set PYTHON=...)"; exit 1; }
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV) || \
	  { echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu install python3-venv"; exit 1; }
	$(VPY) -m pip install --upgrade pip
	PIP_CONSTRAINT=$(CONSTRAINTS) $(VPY) -m pip install --upgrade "setuptools>=64" wheel
	$(VPY) -m pip install -e ".[dev]"
	$(VPY) -m pip install -e ".[mpi]" || \
	  echo "note: could not install convc[mpi]; the distributed tests will be skipped"
	$(VPY) -m pip install -e ".[onednn]" || \
	  echo "note: could not install convc[onednn] (a Linux x86-64 wheel); the oneDNN tests will be skipped"
	PIP_BUILD_CONSTRAINT=$(CONSTRAINTS) PIP_CONSTRAINT=$(CONSTRAINTS) \
	  $(VPY) -m pip install "$(CHAINER_SPEC)"
	@if [ -n "$(JAX_SPEC)" ]; then \
	  $(VPY) -m pip install "$(JAX_SPEC)" || \
	    echo "note: could not install $(JAX_SPEC); the convc.jax tests will be skipped"; \
	fi
	@if [ -n "$(TORCH_SPEC)" ]; then \
	  PIP_CONSTRAINT=$(CONSTRAINTS) $(VPY) -m pip install "$(TORCH_SPEC)" || \
	    echo "note: could not install $(TORCH_SPEC); the torch oracle tests will be skipped"; \
	fi
	@touch $@

# The second pass runs the tests that compare numbers (gradients against finite
# differences and Chainer, training, reproducibility) again with every buffer
# the generated code allocates filled with NaN before its first write: a result
# that changes reads memory nobody wrote (docs/reliability.md). The paper-size
# Shi et al. model and the subprocess test are left out of it to keep it near
# a minute and a half on a two-core machine; golden-source tests do not run code.
POISON_TESTS ?= tests/test_gradients.py tests/test_reproducibility.py tests/test_train.py \
	tests/test_chainer_parity.py tests/test_recompute.py tests/test_vjp.py
POISON_SELECT ?= not shi2015 and not fresh_processes

test: $(STAMP)
	$(VPY) -m pytest -q $(PYTEST_ARGS)
	$(VPY) -m pytest -q --poison $(POISON_TESTS) -k "$(POISON_SELECT)" $(PYTEST_ARGS)

# --overwrite: a second `make demo` starts afresh; --threads 1: the demo's small GEMMs
# run faster on one BLAS thread than on two competing for a busy machine
demo: $(STAMP)
	$(VENV)/bin/convc train $(DEMO_SPEC) --data synthetic --out $(DEMO_OUT) --overwrite \
	  --threads 1 $(DEMO_ARGS)

fuzz: $(STAMP)
	$(VPY) -m pytest -q tests/test_fuzz.py --hypothesis-profile=fuzz $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/convc bench

QUALITY_MINUTES ?= 15
# train examples/shi2015_small.cell for a fixed budget and write bench/QUALITY.md
quality: $(STAMP)
	$(VPY) bench/quality.py --minutes $(QUALITY_MINUTES)

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis $(DEMO_OUT)
	rm -f *.generated.py seed_model.py
	find . -path ./$(VENV) -prune -o -path ./.git -prune -o \
	  -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
