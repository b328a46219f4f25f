# Two entry points of the README's Quick start. Each installs what it needs into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

# constraints.txt pins every package to the versions this project is tested with (pyproject.toml
# holds the supported ranges); torch==2.13.0 takes the CPU build that lies on the dev/CI disk.
$(BIN)/ddpm: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'  # test pulls in the gpu, diffusers and train extras
	touch $@

.PHONY: serve test lint
serve: $(BIN)/ddpm
	$(BIN)/ddpm serve --host $(HOST) --port $(PORT)

# The files whose figures depend on the CPU's kernels (batched rounding, the shipped model's pinned pixels).
# On an AVX-512 machine they run a second time on the AVX2 kernels (ATen's, oneDNN's and MKL's capped), as an
# AVX2-only CPU runs them: a tolerance that holds on one ISA only fails here, not on a user's machine.
NUMERICS := tests/test_continuous_batcher.py tests/test_reverse_chain.py tests/test_restart.py tests/test_image_editing.py \
	tests/test_guidance.py tests/test_shipped_model.py tests/test_scheduling.py tests/test_offline_is_served.py tests/test_previews.py
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2

# In parallel, one worker per core (pytest-xdist): a file's tests run on one worker in order (their module
# fixtures are shared), the slowest files first (tests/conftest.py). `make test WORKERS=0` runs in one process.
WORKERS ?= auto
XDIST = -n $(WORKERS) --dist loadfile --no-loadscope-reorder

test: $(BIN)/ddpm
	$(BIN)/ruff check .
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q $(XDIST)
	if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then \
	  echo "AVX-512 CPU: the numerics files again on the AVX2 kernels"; \
	  $(AVX2) TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(XDIST) $(NUMERICS); \
	fi

lint: $(BIN)/ddpm
	$(BIN)/ruff check .
