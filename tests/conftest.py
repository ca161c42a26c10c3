import os
import shutil
import tempfile

import pytest

# One JAX compilation cache for the session, shared with the processes the tests start (CLI runs,
# multi-process runs): many tests compile the same tiny models' steps, and on a 2-core machine
# compiling them again took about a sixth of the suite's time. Removed when the session ends.
_COMPILATION_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": None,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}


def pytest_configure(config):
    _COMPILATION_CACHE["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vit-jax-tests-xla-")
    os.environ.update(_COMPILATION_CACHE)
    import jax  # (if a plugin imported it already, the variables above came too late for it)

    for name, value in _COMPILATION_CACHE.items():
        jax.config.update(name.lower(), int(value) if value.lstrip("-").isdigit() else value)


def pytest_unconfigure(config):
    shutil.rmtree(_COMPILATION_CACHE["JAX_COMPILATION_CACHE_DIR"] or "", ignore_errors=True)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Every test gets an empty $VIT_JAX_CACHE (downloads, image-folder scan cache), not ~/.cache."""
    monkeypatch.setenv("VIT_JAX_CACHE", str(tmp_path_factory.mktemp("vit_jax_cache")))
