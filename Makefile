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

# Fashion-MNIST (vlpt.data.fashion) ships as a Debian package; installed when missing and apt is here.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
$(FASHION_MNIST):
	@command -v apt-get >/dev/null || { echo "no apt-get: put the Fashion-MNIST IDX files in $(dir $@)"; exit 1; }
	apt-get install -y dataset-fashion-mnist || { apt-get update && apt-get install -y dataset-fashion-mnist; }

install: $(VENV)/.installed

demo: install
	$(BIN)/vlpt demo

test: install $(FASHION_MNIST)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
