"""What the model looks at: attention rollout and last-layer class-token attention.

    python -m vit_jax.visualize --model ViT-B_16 --checkpoint ViT-B_16.npz cat.jpg --out map.png
    python -m vit_jax.visualize --workdir runs/my-run image.png --out map.png --heads_out heads.png
    python -m vit_jax.visualize figures --model ViT-B_16 --checkpoint ViT-B_16.npz --out figs/

Attention weights are collected only when asked, by making the model's `intermediates` collection
mutable for one forward pass; the ordinary forward pass uses the fused attention kernel and stores nothing.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from vit_jax import predict
from vit_jax.checkpoint import square_grid
from vit_jax.commands import atomic_path, interruptible, positive_int, prog, user_path


def attention_weights(model: Any, params: Any, images: Any) -> list[np.ndarray]:
    """Per layer, the softmax attention (N, heads, L, L) for NHWC images in [-1, 1]."""
    return [np.asarray(w) for w in _attention_fn(model)(params, images)]


@functools.cache
def _attention_fn(model: Any) -> Any:
    """`model`'s forward pass that returns each layer's sown attention weights, compiled once per
    model and input shape. Op by op, ViT-B/16 took 3.1 s for its first image and 0.51 s for each
    next one on a 2-core CPU; compiled, 1.1-1.7 s and 0.25-0.31 s (two measurements)."""
    import jax

    @jax.jit
    def weights(params: Any, images: Any) -> list[Any]:
        _, state = model.apply({"params": params}, images, train=False, mutable=["intermediates"])
        blocks = state["intermediates"]["Transformer"]
        return [
            blocks[f"encoderblock_{i}"]["MultiHeadDotProductAttention_1"]["attention_weights"][0]
            for i in range(model.num_layers)
        ]

    return weights


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
    with atomic_path(path) as tmp:
        out.save(tmp)
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def embedded_images(num: int, size: tuple[int, int]) -> np.ndarray:
    """`num` test images of scikit-learn's embedded digits, RGB, resized to `size`, in [-1, 1]."""
    from PIL import Image

    from vit_jax.input_pipeline import _digits_split

    images, _ = _digits_split("test")
    out = [
        np.asarray(
            Image.fromarray(im[..., 0]).convert("RGB").resize((size[1], size[0]), Image.BILINEAR),
            np.float32,
        )
        for im in images[:num]
    ]
    return np.stack(out) / 127.5 - 1.0


def figures_main(argv: Sequence[str]) -> None:
    """`python -m vit_jax.visualize figures ...`: the paper's figures for a checkpoint."""
    from vit_jax import figures

    parser = argparse.ArgumentParser(
        prog=prog("vit_jax.visualize") + " figures",
        description="Writes the paper's Figure 7 (embedding filters' principal components, position "
        "embedding similarity, mean attention distance) for a checkpoint, plus a patch grid and a "
        "top-k bar chart for one image.",
    )
    predict.add_model_arguments(parser)
    parser.add_argument(
        "--out", type=user_path, default="figures", help="directory for the PNGs (default figures/)"
    )
    parser.add_argument(
        "--images",
        nargs="+",
        type=user_path,
        help="images or directories averaged for the attention distances "
        "(default: the embedded digits test images)",
    )
    parser.add_argument(
        "--num_images", type=positive_int, default=32, help="at most this many images (default 32)"
    )
    parser.add_argument(
        "--image",
        type=user_path,
        help="the image for the patch grid and the top-k chart (default: the first)",
    )
    parser.add_argument(
        "--labels", type=user_path, help="as for vit_jax.predict (default: ImageNet / the run's)"
    )
    parser.add_argument("--top_k", type=positive_int, default=5)
    args = parser.parse_args(argv)

    model, params = predict.load_model_from_args(parser, args)
    size = predict.input_size(model, params)
    if args.images:
        files = predict.find_images(args.images)[: args.num_images]
        loaded, failed = [], []
        for f in files:
            try:
                loaded.append(predict.load_image(f, size))
            except Exception as e:  # PIL raises many types for bad files; report and go on
                failed.append(f"{f} ({type(e).__name__}: {e})")
        for f in failed:
            print(f"could not read {f}", file=sys.stderr)
        if not loaded:
            print(f"error: no readable images in {' '.join(args.images)}", file=sys.stderr)
            sys.exit(2)
        images = np.stack(loaded)
    else:
        images = embedded_images(args.num_images, size)

    image, predictions = images[0], None
    if args.image:
        try:
            image = predict.load_image(args.image, size)
        except (OSError, ValueError) as e:
            print(f"error: could not read {args.image}: {e}", file=sys.stderr)
            sys.exit(2)
    if model.num_classes:
        try:
            labels = predict.read_labels(args.labels, model.num_classes, predict.labels_run(args))
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        predictions = predict.top_k(model, params, image[None], labels, args.top_k)[0]

    result = figures.paper_figures(model, params, args.out, images, image, predictions)
    dist = result["arrays"]["mean_attention_distance"]
    print(
        f"mean attention distance over {len(images)} images: first layer "
        f"{dist[0].min():.1f}-{dist[0].max():.1f} px, last layer {dist[-1].min():.1f}-"
        f"{dist[-1].max():.1f} px"
    )
    for path in result["files"].values():
        print(f"wrote {path}")


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["figures"]:
        figures_main(argv[1:])
        return
    parser = argparse.ArgumentParser(
        prog=prog("vit_jax.visualize"),
        description=__doc__.split("\n\n")[0]
        + " (`python -m vit_jax.visualize figures --help`: the paper's figures.)",
    )
    parser.add_argument("image", type=user_path, help="an image file")
    predict.add_model_arguments(parser)
    parser.add_argument(
        "--out", type=user_path, default="attention.png", help="overlay PNG of the rollout map"
    )
    parser.add_argument(
        "--heads_out",
        type=user_path,
        help="also write the last layer's per-head class-token attention",
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
