# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
# Override for another build, e.g. `make test TORCH="torch==2.13.0 --index-url <a CUDA wheel index>"`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.normkit-run
DEV_STAMP := $(VENV)/.normkit-dev
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) $(TORCH)
	$(PIP) -e .
	touch $@

$(DEV_STAMP): $(RUN_STAMP)
	$(PIP) -e ".[dev]"
	touch $@

demo: $(RUN_STAMP)
	$(BIN)/normkit demo

test: $(DEV_STAMP)
	$(BIN)/python -m ruff check src tests benchmarks examples
	$(BIN)/python -m pytest

bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/bench_batchnorm.py

clean:
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache .ruff_cache .hypothesis

# --- torch version matrix (issue 16): the drop-ins and the family against several torch releases ----------------
# One venv per version, .venv-torch<VERSION>: torch from PyPI (a CUDA build there, which imports and runs on a CPU),
# normkit editable, and the test tools only (no keras, onnx or lightning: the tests below do not use them).
# `make test-matrix` runs every leg; `make test-torch-2.15.0` one (any version); `make test-matrix-ci` the floor and
# the newest (CI). pip's cap on this machine (/etc/xdg/pip/constraints.txt: torch<=2.14.1) is replaced per venv by a
# constraint file pinning that venv's torch, so later installs there can neither refuse nor move it. A local wheel:
# `PIP_FIND_LINKS="/opt/wheels <dir>" make test-torch-2.11.0`.
# The floor is pyproject.toml's (torch>=2.11; tests/test_torch_versions.py checks the two agree): torch 2.11 lacks
# bias= on its norm layers, which normkit backports (normkit/nn/_torch_compat.py). 2.13.0 is `make test`'s;
# 2.14.1 lies on this machine's disk. One leg from scratch: about 4 min (venv + install ~2, tests ~2).
TORCH_FLOOR ?= 2.11.0
TORCH_ON_DISK ?= 2.14.1
TORCH_NEWEST ?= 2.15.0
MATRIX_VERSIONS ?= $(TORCH_FLOOR) $(TORCH_ON_DISK) $(TORCH_NEWEST)
MATRIX_TOOLS := "pytest>=8" "hypothesis>=6.100" "expecttest>=0.2"
MATRIX_TESTS ?= tests/test_torch_versions.py tests/test_contract.py tests/test_family_contract.py tests/peer \
	tests/test_norm_dropins.py tests/test_model_patterns.py tests/test_compiler_stack.py tests/test_sync_contract.py \
	tests/test_sync_batchnorm.py tests/test_functional_batch_norm.py tests/test_frozen.py tests/test_tools_convert.py \
	tests/test_param_groups.py

.PHONY: test-matrix test-matrix-ci test-torch-floor test-torch-newest
.PRECIOUS: .venv-torch%/.normkit-matrix

.venv-torch%/.normkit-matrix: pyproject.toml
	$(PYTHON) -m venv .venv-torch$*
	echo "torch==$*" > .venv-torch$*/constraints.txt
	PIP_CONSTRAINT=$(CURDIR)/.venv-torch$*/constraints.txt .venv-torch$*/bin/python -m pip install --quiet \
		--disable-pip-version-check "torch==$*" -e . $(MATRIX_TOOLS)
	touch $@

test-torch-%: .venv-torch%/.normkit-matrix
	.venv-torch$*/bin/python -c "import torch; assert torch.__version__.split('+')[0] == '$*', torch.__version__"
	.venv-torch$*/bin/python -m pytest -q -p no:cacheprovider $(MATRIX_TESTS)

test-matrix: $(addprefix test-torch-,$(MATRIX_VERSIONS))
test-matrix-ci: test-torch-$(TORCH_FLOOR) test-torch-$(TORCH_NEWEST)
test-torch-floor: test-torch-$(TORCH_FLOOR)
test-torch-newest: test-torch-$(TORCH_NEWEST)

# --- the wheel as a user gets it (issue 16) -----------------------------------------------------------------------
# Builds sdist + wheel, checks their contents, installs the wheel (not editable) in a fresh temporary venv, runs
# `normkit --version`, the demo and the import budget there (.ci/wheel_check.sh says what each step checks).
# About 2.5 min, most of it pip installing torch, lightning and triton into the fresh venv.
.PHONY: wheel-check

wheel-check:
	PYTHON=$(PYTHON) TORCH="$(TORCH)" bash .ci/wheel_check.sh

# --- the docs site (issue 16): docs/*.md as guides, docs/reference/ made from the docstrings -----------------------
# `make docs` builds it into site/ with warnings as errors (a broken link, cross-reference or documented parameter
# fails it). mkdocs.yml says what renders how; docs/_ext/ holds its two extensions (normkit's reST docstrings as
# Markdown; the table of the top-level names). To read it: `make docs-serve` (http://127.0.0.1:8000, rebuilt on each
# edit), or serve site/ with `python -m http.server -d site` (opened as files, its links lead to folder listings).
# tests/test_docs_site.py checks the pages, the nav and the extensions in seconds; its docstring checks need the docs
# tools in .venv (this target installs them; `make test` alone does not, and skips those), so CI runs `make docs`
# before `make test`.
# Time: installing the docs extra ~30 s once, the build ~12 s.
DOCS_STAMP := $(VENV)/.normkit-docs
.PHONY: docs docs-serve

$(DOCS_STAMP): $(RUN_STAMP)
	$(PIP) -e ".[docs]"
	touch $@

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

docs-serve: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs serve --strict

# --- GPU check wheels (issue 13): Liger-Kernel for benchmarks/gpu_check.sh's LayerNorm baseline ------------------
# The device machine has no network: download the liger-kernel wheel here, WITHOUT its dependencies (the device's
# python3 has torch and triton), into .gpu-wheels/ (git-ignored), and carry it: run(command="bash
# benchmarks/gpu_check.sh", timeout_s=540, carry=[".gpu-wheels"]). gpu_check.sh installs it into a temporary
# folder on PYTHONPATH when the folder is there, and skips the Liger baseline with a clear line when it is not.
.PHONY: gpu-wheels

gpu-wheels: | $(BIN)/python
	$(BIN)/python -m pip download --no-deps --only-binary=:all: --dest .gpu-wheels liger-kernel

# --- the kernels on the oldest supported stack (issue 13): torch 2.11 with Triton 3.6, under the interpreter --------
# The floor venv of the matrix (torch 2.11 from PyPI brings Triton 3.6.0) runs every kernel test under Triton's
# interpreter, including the offline sm_90 compile of every launched variant with Triton 3.6's own compiler. Triton
# 3.6's interpreter converts 1-element arrays to Python ints, which numpy 2.4 refuses and numpy 2.3 only warns about:
# this venv pins numpy below 2.4 and silences that one warning (the GPU path does not use numpy). About 2 min.
KERNEL_TESTS ?= tests/test_kernels_batch_norm.py tests/test_kernels_host.py tests/test_kernels_rownorm.py \
	tests/test_kernels_tuning.py tests/test_kernels_compile_for_gpu.py
.PHONY: test-kernels-compat

test-kernels-compat: .venv-torch$(TORCH_FLOOR)/.normkit-matrix
	PIP_CONSTRAINT=$(CURDIR)/.venv-torch$(TORCH_FLOOR)/constraints.txt .venv-torch$(TORCH_FLOOR)/bin/python -m pip \
		install --quiet --disable-pip-version-check "numpy<2.4" "triton==3.6.0"
	.venv-torch$(TORCH_FLOOR)/bin/python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
	TRITON_INTERPRET=1 .venv-torch$(TORCH_FLOOR)/bin/python -m pytest -q -p no:cacheprovider \
		-W "ignore:Conversion of an array with ndim > 0:DeprecationWarning" $(KERNEL_TESTS)
