# The README's two commands: `make demo` (install + the main job on the tiny world) and `make test`
# (install + the test suites). Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, pinned by TORCH_SPEC, then the package (which accepts any torch >= 2.4).
# Which build the pin gives depends on pip's index: a local folder of CPU wheels (this project's CI machines)
# gives the CPU build, while PyPI's plain torch==2.13.0 on Linux is the CUDA build (several GB of nvidia-*
# wheels). CPU-only elsewhere: make test TORCH_SPEC="torch==2.13.0 --index-url <PyTorch's CPU wheel index>"
# GPU runner:                 make install TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
ifneq ($(wildcard ../shared/data/dialogsum),)
export DIALOGSUM_DIR ?= $(abspath ../shared/data/dialogsum)
endif

.PHONY: install demo test lint unit integration gpu bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# setuptools' editable build says "Editable installation. Please be careful with folders in your working directory
# with the same name as your package" for any flat layout: a notice, not a fault, that no user can act on
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/detox-harness run --preset tiny

test: install lint
	$(BIN)/python -m pytest suites/unit suites/integration suites/gpu $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

unit: install
	$(BIN)/python -m pytest suites/unit $(PYTEST_ARGS)

integration: install
	$(BIN)/python -m pytest suites/integration $(PYTEST_ARGS)

gpu: install
	$(BIN)/python -m pytest suites/gpu --run-gpu $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/bench_rollout.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
