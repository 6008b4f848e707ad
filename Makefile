# `make run`, `make serve` and `make test` work on a fresh machine: the first use
# creates .venv and installs the pinned dependencies (torch from the CPU wheel).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export TOKENIZERS_PARALLELISM := false

.PHONY: run serve test bench clean venv browser

venv: $(STAMP)

# uv installs the pinned set in seconds where pip takes over a minute (the whole of a fresh venv
# here: 45 s against 85 s). It compiles the bytecode as pip does: where PYTHONDONTWRITEBYTECODE is
# set nothing else would, and every process the suite starts would compile torch's sources again.
# torch's wheel is the one pip's configuration picks (the CPU wheel lying on this project's
# machines), handed to uv as a file; a torch already installed (a GPU user's CUDA build) satisfies
# the pin and stays. pip installs everything when uv cannot.
UV_VERSION := 0.13.10
TORCH_WHEEL := $(VENV)/torch-wheel

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip uv==$(UV_VERSION)
	$(BIN)/pip show -q torch 2>/dev/null || $(BIN)/pip download -q --no-deps -c requirements.txt torch -d $(TORCH_WHEEL)
	$(BIN)/uv pip install -q --no-cache --compile-bytecode --python $(BIN)/python $$(ls $(TORCH_WHEEL)/*.whl 2>/dev/null) -r requirements-dev.txt \
	  || $(BIN)/pip install -q -r requirements-dev.txt
	rm -rf $(TORCH_WHEEL)
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Browsers for the editor's tests: Debian's chromium (Playwright never downloads one) and
# firefox-esr (driven over WebDriver BiDi). Installed when missing and we are root.
browser:
	@missing=""; command -v chromium >/dev/null || missing="chromium"; \
	  command -v firefox-esr >/dev/null || command -v firefox >/dev/null || missing="$$missing firefox-esr"; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ]; then { apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; } \
	      || echo "could not install $$missing; the browser tests that need it will say so"; \
	    else echo "install Debian's $$missing package(s) for the browser tests"; fi; fi

# Runs workflows/img2img.json headless on the sample image with the first checkpoint in
# models/checkpoints/ (a random-weight demo one when there is none; it says so).
run: $(STAMP)
	$(BIN)/python -m nodes.demo run

serve: $(STAMP)
	$(BIN)/python -m nodes.demo prepare --input $${KILN_DATA:-data}/input
	$(BIN)/kiln serve

# The suite runs in TEST_WORKERS processes (pytest-xdist), each given whole test files so module-scoped
# fixtures are built once, and each running torch on one thread so the processes do not fight over cores.
TEST_WORKERS ?= 2

# Bytecode is compiled first: the suite starts dozens of Python processes (kiln serve, kiln run, cluster
# workers), and where PYTHONDONTWRITEBYTECODE is set (as on this machine) each would compile Kiln's sources again.
test: $(STAMP) browser
	$(BIN)/python -m compileall -q engine nodes tests >/dev/null
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=25

bench: $(STAMP)
	$(BIN)/python bench/img2img_vs_diffusers.py

clean:
	rm -rf $(VENV) data .pytest_cache
