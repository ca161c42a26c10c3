# The README's commands. Each one creates its own virtual environment and installs from nothing.
#   make demo   - the main job: fine-tune a ViT offline on the embedded digits dataset
#   make test   - lint + format check + the test suite
#   make test-oldest - the test suite on the lowest versions pyproject.toml allows
#   make test-newest - the test suite on Python 3.13, where pip finds the newest jax and flax
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-oldest test-newest lint install clean

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
PYTEST := -m pytest -q -n 2
test: lint
	$(PY) $(PYTEST)

# The lowest version of every direct dependency that pyproject.toml allows (uv's lowest-direct
# resolution), in a venv of its own: what a user whose environment holds older packages may get.
OLDEST := .venv-oldest
UV := $(VENV)/bin/uv
test-oldest: $(STAMP)
	rm -rf $(OLDEST)
	$(PYTHON) -m venv $(OLDEST)
	$(UV) pip compile --quiet --resolution lowest-direct --python $(OLDEST)/bin/python \
		--extra test pyproject.toml -o $(OLDEST)/requirements.txt
	$(UV) pip install --quiet --python $(OLDEST)/bin/python -r $(OLDEST)/requirements.txt
	$(UV) pip install --quiet --python $(OLDEST)/bin/python --no-deps -e .
	$(OLDEST)/bin/python $(PYTEST)

# jax 0.11 and later (and flax 0.12.9 and later) need Python 3.12 or newer, so a `python3` 3.11
# gets jax 0.10: the suite again in a venv of the newest Python the project supports. And at XLA's
# default code generation (level 3), as users' programs compile: the other runs compile at level 0
# (tests/conftest.py), which is faster for the tests' tiny models.
NEWEST_PYTHON ?= python3.13
NEWEST := .venv-newest
test-newest:
	$(MAKE) VENV=$(NEWEST) PYTHON=$(NEWEST_PYTHON) install
	$(NEWEST)/bin/python -c "import sys, jax, flax; print('Python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__)"
	XLA_FLAGS="--xla_backend_optimization_level=3 $$XLA_FLAGS" $(NEWEST)/bin/python $(PYTEST)

clean:
	rm -rf $(VENV) $(OLDEST) $(NEWEST) build *.egg-info .pytest_cache .ruff_cache
