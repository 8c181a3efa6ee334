# Each target creates .venv and installs the package on a fresh machine that has only Python and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Torch first, pinned, so pip does not pull a different build through a dependency.
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= demo-out

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/radpretrain demo $(DEMO_OUT)

lint: $(STAMP)
	$(VENV)/bin/ruff check radpretrain tests bench
	$(VENV)/bin/mypy radpretrain

test: $(STAMP) lint
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/shard.py
	$(PY) bench/loader.py
	$(PY) bench/crop_resize.py
	$(PY) bench/step.py
	$(PY) bench/decode_fidelity.py
	$(PY) bench/ocr.py
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .mypy_cache .ruff_cache
