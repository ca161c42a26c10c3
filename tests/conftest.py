import pytest


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Every test gets an empty $VIT_JAX_CACHE (downloads, image-folder scan cache), not ~/.cache."""
    monkeypatch.setenv("VIT_JAX_CACHE", str(tmp_path_factory.mktemp("vit_jax_cache")))
