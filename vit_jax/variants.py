"""The one table of model sizes: name -> `VisionTransformer` attributes.

Names are those of the reference's `configs/models.py` and of the published files
(`gs://vit_models/imagenet21k/{name}.npz`). Build a model with `vit_jax.models.get_model(name, ...)`.
"""

from __future__ import annotations

from typing import Any

_SIZES: dict[str, dict[str, Any]] = {
    # hidden_size, mlp_dim, num_heads, num_layers
    "Ti": dict(hidden_size=192, mlp_dim=768, num_heads=3, num_layers=12),
    "S": dict(hidden_size=384, mlp_dim=1536, num_heads=6, num_layers=12),
    "B": dict(hidden_size=768, mlp_dim=3072, num_heads=12, num_layers=12),
    "L": dict(hidden_size=1024, mlp_dim=4096, num_heads=16, num_layers=24),
    "H": dict(hidden_size=1280, mlp_dim=5120, num_heads=16, num_layers=32),
}


def _vit(size: str, patch: int, **kw: Any) -> dict[str, Any]:
    return {**_SIZES[size], "patch_size": (patch, patch), **kw}


def _hybrid(size: str, resnet_layers: tuple[int, ...], patch: int = 1, **kw: Any) -> dict[str, Any]:
    return _vit(size, patch, resnet_layers=resnet_layers, resnet_width_factor=1.0, **kw)


_TESTING = dict(
    patch_size=(16, 16), hidden_size=10, mlp_dim=10, num_heads=2, num_layers=1, dropout_rate=0.1
)

VARIANTS: dict[str, dict[str, Any]] = {
    "testing": _TESTING,
    "testing-unpooled": {**_TESTING, "classifier": "token_unpooled"},
    "ViT-Ti_16": _vit("Ti", 16),
    "ViT-S_16": _vit("S", 16),
    "ViT-S_32": _vit("S", 32),
    "ViT-B_8": _vit("B", 8),
    "ViT-B_16": _vit("B", 16),
    "ViT-B_32": _vit("B", 32),
    "ViT-L_16": _vit("L", 16, dropout_rate=0.1),
    "ViT-L_32": _vit("L", 32),
    "ViT-H_14": _vit("H", 14, dropout_rate=0.1),
    "ViT-S_16-gap-norep": _vit("S", 16, classifier="gap"),
    "ViT-S_32-gap-norep": _vit("S", 32, classifier="gap"),
    "ViT-B_16-gap-norep": _vit("B", 16, classifier="gap"),
    "ViT-B_32-gap-norep": _vit("B", 32, classifier="gap"),
    # Hybrids: the stem downsamples 4x, then 2x per stage after the first.
    "R+ViT-Ti_16": _hybrid("Ti", (), patch=8),
    "R50+ViT-B_16": _hybrid("B", (3, 4, 9), dropout_rate=0.1),
    "R26+ViT-S_32": _hybrid("S", (2, 2, 2, 2)),
    "R26+ViT-B_32": _hybrid("B", (2, 2, 2, 2)),
    "R50+ViT-L_32": _hybrid("L", (3, 4, 6, 3), dropout_rate=0.1),
}
