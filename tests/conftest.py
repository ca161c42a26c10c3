import os
import shutil
import tempfile

import pytest

# One JAX compilation cache for the session, shared with the processes the tests start (CLI runs,
# multi-process runs): many tests compile the same tiny models' steps, and on a 2-core machine
# compiling them again took about a sixth of the suite's time. Removed when the session ends.
# With pytest-xdist (`make test` runs two workers) the main process makes it and the workers
# share it.
_CACHE_SETTINGS = {
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": -1,
}
_cache_dir = ""


def pytest_configure(config):
    global _cache_dir
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the main process's cache
        cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    else:
        _cache_dir = cache = tempfile.mkdtemp(prefix="vit-jax-tests-xla-")
    settings = {"jax_compilation_cache_dir": cache, **_CACHE_SETTINGS}
    os.environ.update({name.upper(): str(value) for name, value in settings.items()})
    # XLA's code generation without LLVM's optimisations (the HLO passes, fusion and the library
    # matmuls stay as they are): the tiny models' programs compile in about half the time, and
    # compiling is most of their tests' time (the suite: 9:42 -> 6:48 on 2 cores). A level given in
    # XLA_FLAGS is kept: `make test-newest` runs the suite at XLA's default, 3, as users' runs
    # compile. The tests that set a device count add theirs to these flags.
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    import jax  # (if a plugin imported it already, the variables above came too late for it)

    for name, value in settings.items():
        jax.config.update(name, value)


def pytest_unconfigure(config):
    if _cache_dir:
        shutil.rmtree(_cache_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Every test gets an empty $VIT_JAX_CACHE (downloads, image-folder scan cache), not ~/.cache,
    and its own temporary folder ($TMPDIR, `tempfile.tempdir`, for the processes it starts too)
    under pytest's, which pytest removes: TFDS makes an empty one in the system's at every builder
    of a dataset not prepared yet (`DatasetInfo.initialize_from_bucket`) and never removes it."""
    monkeypatch.setenv("VIT_JAX_CACHE", str(tmp_path_factory.mktemp("vit_jax_cache")))
    tmp = str(tmp_path_factory.mktemp("tmpdir"))
    monkeypatch.setenv("TMPDIR", tmp)
    monkeypatch.setattr(tempfile, "tempdir", tmp)
