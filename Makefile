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

test: $(BIN)/ddpm
	$(BIN)/ruff check .
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

lint: $(BIN)/ddpm
	$(BIN)/ruff check .
