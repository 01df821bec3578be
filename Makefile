# The two commands: `make demo` and `make test`. Each creates .venv if missing and installs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Versions this machine serves from local disk; the pyproject states the range users elsewhere can satisfy.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_PINS)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/vlpt demo

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
