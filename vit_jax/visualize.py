"""What the model looks at: attention rollout and last-layer class-token attention.

    python -m vit_jax.visualize --model ViT-B_16 --checkpoint ViT-B_16.npz cat.jpg --out map.png
    python -m vit_jax.visualize --workdir runs/my-run image.png --out map.png --heads_out heads.png

Attention weights are collected only when asked, by making the model's `intermediates` collection
mutable for one forward pass; the ordinary forward pass uses the fused attention kernel and stores nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from vit_jax import predict
from vit_jax.checkpoint import square_grid


def attention_weights(model: Any, params: Any, images: Any) -> list[np.ndarray]:
    """Per layer, the softmax attention (N, heads, L, L) for NHWC images in [-1, 1]."""
    _, state = model.apply({"params": params}, images, train=False, mutable=["intermediates"])
    blocks = state["intermediates"]["Transformer"]
    return [
        np.asarray(
            blocks[f"encoderblock_{i}"]["MultiHeadDotProductAttention_1"]["attention_weights"][0]
        )
        for i in range(model.num_layers)
    ]


def attention_rollout(weights: Sequence[np.ndarray]) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020): (N, L, L), each row a distribution over tokens.

    Each layer's attention is averaged over heads, mixed half-and-half with the identity (the residual
    connection), renormalised, and the layers are multiplied from the first to the last.
    """
    rollout = None
    for w in weights:
        a = w.astype(np.float64).mean(axis=1)
        a = 0.5 * a + 0.5 * np.eye(a.shape[-1])
        a /= a.sum(axis=-1, keepdims=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


def _grid(num_patches: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    grid = grid or square_grid(num_patches)
    if grid is None or grid[0] * grid[1] != num_patches:
        raise ValueError(f"{num_patches} patches do not make a {grid or 'square'} grid; pass grid")
    return grid


def rollout_map(
    rollout: np.ndarray, has_class_token: bool, grid: tuple[int, int] | None = None
) -> np.ndarray:
    """(N, gh, gw): how much the output draws on each patch, scaled to a maximum of 1.

    For a class-token model this is the class token's row over the patches; for a gap model, the mean
    of the patch rows (the average that feeds the head).
    """
    m = rollout[:, 0, 1:] if has_class_token else rollout.mean(axis=1)
    m = m.reshape(m.shape[0], *_grid(m.shape[1], grid))
    return m / m.max(axis=(1, 2), keepdims=True)


def class_token_attention(
    weights: Sequence[np.ndarray], grid: tuple[int, int] | None = None
) -> np.ndarray:
    """Last layer's attention of the class token to every patch, per head: (N, heads, gh, gw)."""
    last = weights[-1][:, :, 0, 1:]
    return last.reshape(*last.shape[:2], *_grid(last.shape[-1], grid))


def overlay(image: np.ndarray, heat: np.ndarray, path: str, title: str | None = None) -> str:
    """Writes a PNG of the image's size: the image with `heat` (gh, gw) resized over it as a colour map.

    `image` is (H, W, 3) in [-1, 1] or uint8.
    """
    from matplotlib import colormaps
    from PIL import Image

    rgb = (
        image if image.dtype == np.uint8 else np.clip((image + 1) * 127.5, 0, 255).astype(np.uint8)
    )
    h, w = rgb.shape[:2]
    heat_img = Image.fromarray(np.uint8(255 * np.clip(heat, 0, 1))).resize((w, h), Image.BILINEAR)
    colored = colormaps["inferno"](np.asarray(heat_img) / 255.0)[..., :3] * 255
    blended = (0.5 * rgb + 0.5 * colored).astype(np.uint8)
    out = Image.fromarray(blended)
    if title:
        out.info["Title"] = title
    out.save(path)
    return path


def heads_figure(image: np.ndarray, per_head: np.ndarray, path: str) -> str:
    """A figure: the image, then one panel per head of the last layer's class-token attention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = per_head.shape[0] + 1
    cols = min(n, 7)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    rgb = image if image.dtype == np.uint8 else np.clip((image + 1) / 2, 0, 1)
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_title("image")
    for i in range(per_head.shape[0]):
        ax = axes.flat[i + 1]
        im = ax.imshow(per_head[i], cmap="inferno")
        ax.set_title(f"head {i}")
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("last layer: class-token attention per head")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vit_jax.visualize", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("image", help="an image file")
    predict.add_model_arguments(parser)
    parser.add_argument("--out", default="attention.png", help="overlay PNG of the rollout map")
    parser.add_argument(
        "--heads_out", help="also write the last layer's per-head class-token attention"
    )
    args = parser.parse_args(argv)

    model, params = predict.load_model_from_args(parser, args)
    try:
        size = predict.input_size(model, params)
        image = predict.load_image(args.image, size)
    except (OSError, ValueError) as e:
        print(f"error: could not read {args.image}: {e}", file=sys.stderr)
        sys.exit(2)
    grid = model.grid_size(size)
    weights = attention_weights(model, params, image[None])
    heat = rollout_map(attention_rollout(weights), model.has_class_token, grid)[0]
    from PIL import Image

    with Image.open(args.image) as im:
        original = np.asarray(im.convert("RGB"))
    print(f"wrote {overlay(original, heat, args.out, 'attention rollout')}")
    if args.heads_out:
        if not model.has_class_token:
            parser.error("--heads_out needs a class-token model")
        print(
            f"wrote {heads_figure(image, class_token_attention(weights, grid)[0], args.heads_out)}"
        )


if __name__ == "__main__":
    main()
