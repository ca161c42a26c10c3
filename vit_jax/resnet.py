"""ResNet-v2 stem of the hybrid models (R50+ViT-B_16, R26+ViT-S_32, ...).

Weight-standardised convolutions followed by GroupNorm, as in BiT. Parameter names are those of the
published hybrid checkpoints (`conv_root`, `gn_root`, `block{i}/unit{j}/{conv1,gn1,...}`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def weight_standardize(w: jax.Array, axis: Sequence[int], eps: float = 1e-5) -> jax.Array:
    """Normalises a conv kernel to zero mean and unit standard deviation over `axis`."""
    w = w - jnp.mean(w, axis=axis, keepdims=True)
    return w / (jnp.std(w, axis=axis, keepdims=True) + eps)


class StdConv(nn.Module):
    """A bias-free convolution whose kernel is weight-standardised over (kh, kw, in).

    Input (N, H, W, C_in) -> output (N, H', W', features), SAME padding.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (*self.kernel_size, x.shape[-1], self.features),
            jnp.float32,
        )
        kernel = weight_standardize(kernel, axis=(0, 1, 2)).astype(self.dtype)
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel,
            window_strides=self.strides,
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


class ResidualUnit(nn.Module):
    """Bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1 with 4x expansion, GroupNorm after each conv."""

    features: int
    strides: tuple[int, int] = (1, 1)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gn = lambda name, **kw: nn.GroupNorm(name=name, dtype=self.dtype, **kw)
        residual = x
        if x.shape[-1] != self.features * 4 or self.strides != (1, 1):
            residual = StdConv(
                self.features * 4, (1, 1), self.strides, self.dtype, name="conv_proj"
            )(x)
            residual = gn("gn_proj")(residual)
        y = StdConv(self.features, (1, 1), dtype=self.dtype, name="conv1")(x)
        y = nn.relu(gn("gn1")(y))
        y = StdConv(self.features, (3, 3), self.strides, self.dtype, name="conv2")(y)
        y = nn.relu(gn("gn2")(y))
        y = StdConv(self.features * 4, (1, 1), dtype=self.dtype, name="conv3")(y)
        y = gn("gn3", scale_init=nn.initializers.zeros)(y)
        return nn.relu(residual + y)


class ResNetStage(nn.Module):
    """`block_size` residual units; the first one may downsample with `first_stride`."""

    block_size: int
    nout: int
    first_stride: tuple[int, int]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResidualUnit(self.nout, self.first_stride, self.dtype, name="unit1")(x)
        for i in range(1, self.block_size):
            x = ResidualUnit(self.nout, (1, 1), self.dtype, name=f"unit{i + 1}")(x)
        return x


def stem_stride(num_layers: Sequence[int]) -> int:
    """Total downsampling of `resnet_stem`: 4 for the root, x2 for every stage after the first."""
    return 4 * 2 ** max(len(num_layers) - 1, 0)


def resnet_stem(
    x: jax.Array, num_layers: Sequence[int], width_factor: float = 1.0, dtype: Dtype = jnp.float32
) -> jax.Array:
    """Root conv (7x7/2) + max-pool (3x3/2) + `len(num_layers)` stages: (N, H, W, 3) -> (N, H/s, W/s, C).

    Call it inside a parent's `nn.compact` method: its modules are created in the parent's scope, so
    their parameters sit at the top level of the tree (`conv_root`, `gn_root`, `block1/unit1/...`) as
    in the published hybrid checkpoints. `s = stem_stride(num_layers)`.
    """
    width = int(64 * width_factor)
    x = StdConv(width, (7, 7), (2, 2), dtype, name="conv_root")(x)
    x = nn.relu(nn.GroupNorm(name="gn_root", dtype=dtype)(x))
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
    for i, block_size in enumerate(num_layers):
        stride = (1, 1) if i == 0 else (2, 2)
        x = ResNetStage(block_size, width * 2**i, stride, dtype, name=f"block{i + 1}")(x)
    return x
