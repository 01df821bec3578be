# The two commands: `make demo` and `make test`. Each creates .venv if missing and installs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Versions this machine serves from local disk; the pyproject states the range users elsewhere can satisfy.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install browser clean

# A stamp, not bin/activate, marks the torch step done: a venv whose torch install failed (a full disk, a dropped
# connection) is finished on the next run instead of being taken as ready.
$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_PINS)
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
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

# tests/test_web.py drives Debian's chromium (headless). Installed here when missing (apt, as root); if that cannot
# be done the browser test fails and says how to install it: it is never skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { echo "installing chromium (Debian) for tests/test_web.py"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	    { [ "$$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo apt-get update -qq && \
	      sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	    echo "could not install chromium: tests/test_web.py will fail (apt-get install chromium)"; }

test: install browser $(FASHION_MNIST)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
