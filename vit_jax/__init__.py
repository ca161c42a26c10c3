"""vit-jax: the Vision Transformer in JAX/Flax, with the published checkpoints.

Importing the package loads only jax/flax/numpy; TensorFlow is imported by the input pipeline alone.
"""

from __future__ import annotations

import importlib
from typing import Any

from vit_jax import commands

# Only when this process is `python -m vit_jax...` or a `vit-X` script:
commands.quiet_start()
commands.use_huge_pages()  # may restart the process, before anything else runs

__version__ = "0.1.0"

_LAZY = {
    "VisionTransformer": "vit_jax.models",
    "get_model": "vit_jax.models",
    "count_params": "vit_jax.models",
    "VARIANTS": "vit_jax.variants",
    "summary": "vit_jax.summary",
    "load_pretrained_model": "vit_jax.checkpoint",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vit_jax' has no attribute {name!r}")
