# The README's commands. Each one creates its own virtual environment and installs from nothing.
#   make demo   - the main job: fine-tune a ViT offline on the embedded digits dataset
#   make test   - lint + format check + the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m vit_jax.train --config configs/digits.py --logdir runs --name digits-demo-$$(date +%Y%m%d-%H%M%S)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two pytest workers: most tests spend their time in one-core work (compiling, starting a
# subprocess that imports TensorFlow), so two of them side by side fill a 2-core machine.
test: lint
	$(PY) -m pytest -q -n 2

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
