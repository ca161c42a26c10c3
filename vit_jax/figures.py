"""The paper's pictures of what a ViT learned (Dosovitskiy et al., 2021, Figure 7), from any checkpoint.

    python -m vit_jax.visualize figures --model ViT-B_16 --checkpoint ViT-B_16.npz --out figs/
    python -m vit_jax.visualize figures --workdir runs/my-run --images photos/ --image cat.jpg --out figs/

Each `*_figure` function writes a PNG and returns its path; the arrays come from the functions without
the suffix, so the numbers can be used (and tested) without plotting:

- `embedding_components`: principal components of the patch-embedding filters, as RGB patches;
- `position_similarity`: cosine similarity of every position embedding with every other one;
- `mean_attention_distance`: per layer and head, the attention-weighted image-space distance (pixels)
  between a query patch and the patches it attends to;
- `patch_grid`: an image cut into its patches; plus a top-k probability bar chart (`topk_figure`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vit_jax.commands import atomic_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid_shape(n: int, max_cols: int) -> tuple[int, int]:
    cols = min(n, max_cols)
    return (n + cols - 1) // cols, cols


# ----------------------------------------------------------------------------- arrays


def embedding_components(kernel: np.ndarray, num: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Principal components of the patch-embedding filters.

    `kernel` is the `embedding/kernel` of shape (ph, pw, C, D): D filters of ph x pw x C pixels. The
    filters are centred and decomposed (SVD); returns the first `num` components, each a (ph, pw, C)
    patch of unit norm, as an array (num, ph, pw, C), and the fraction of the filters' variance that
    each explains, (num,).
    """
    kernel = np.asarray(kernel, np.float64)
    if kernel.ndim != 4:
        raise ValueError(f"expected an embedding kernel (ph, pw, C, D), got shape {kernel.shape}")
    ph, pw, c, d = kernel.shape
    filters = kernel.reshape(ph * pw * c, d).T  # (D, ph*pw*C): one row per filter
    filters = filters - filters.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(filters, full_matrices=False)
    num = min(num, vt.shape[0])
    variance = s**2 / max(float(np.sum(s**2)), 1e-30)
    return vt[:num].reshape(num, ph, pw, c), variance[:num]


def position_similarity(
    posemb: np.ndarray, grid: tuple[int, int], has_class_token: bool
) -> np.ndarray:
    """Cosine similarity between the position embeddings of every pair of patches.

    `posemb` is `Transformer/posembed_input/pos_embedding`, (1, L, D) with L = gh*gw (+1 for the class
    token, which is left out). Returns (gh, gw, gh, gw): entry [i, j] is the map of patch (i, j)'s
    similarity with every patch; [i, j, i, j] is 1.
    """
    pe = np.asarray(posemb, np.float64).reshape(-1, np.shape(posemb)[-1])
    if has_class_token:
        pe = pe[1:]
    gh, gw = grid
    if pe.shape[0] != gh * gw:
        raise ValueError(f"{pe.shape[0]} position embeddings do not make a {gh}x{gw} grid")
    unit = pe / np.maximum(np.linalg.norm(pe, axis=-1, keepdims=True), 1e-12)
    return (unit @ unit.T).reshape(gh, gw, gh, gw)


def patch_distances(grid: tuple[int, int], patch_px: tuple[int, int]) -> np.ndarray:
    """(P, P) Euclidean distances in pixels between the centres of the P = gh*gw patches (row-major)."""
    gh, gw = grid
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    centres = np.stack([rows.ravel() * patch_px[0], cols.ravel() * patch_px[1]], axis=-1)
    return np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=-1)


def mean_attention_distance(
    weights: Sequence[np.ndarray],
    grid: tuple[int, int],
    patch_px: tuple[int, int],
    has_class_token: bool,
) -> np.ndarray:
    """Mean attention distance in pixels, (layers, heads).

    `weights` holds one (N, heads, L, L) softmax attention per layer (`visualize.attention_weights`).
    Only patch-to-patch attention counts: the class token's row and column are dropped and each query's
    attention over the patches is renormalised to sum to 1. The distance is the attention-weighted mean
    of the pixel distances from the query patch, averaged over query patches and over the N images.
    Attending only to itself gives 0; uniform attention gives the grid's mean pairwise distance.
    """
    dist = patch_distances(grid, patch_px)
    out = []
    for w in weights:
        w = np.asarray(w, np.float64)
        if has_class_token:
            w = w[..., 1:, 1:]
        if w.shape[-1] != dist.shape[0]:
            raise ValueError(f"attention over {w.shape[-1]} tokens does not match a {grid} grid")
        w = w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-30)
        out.append((w * dist).sum(axis=-1).mean(axis=(0, 2)))  # (heads,)
    return np.stack(out)


def patch_grid(image: np.ndarray, patch_px: tuple[int, int]) -> np.ndarray:
    """(gh, gw, ph, pw, C): the image (H, W, C) cut into its non-overlapping patches, row-major."""
    h, w, c = image.shape
    ph, pw = patch_px
    if h % ph or w % pw:
        raise ValueError(f"image {h}x{w} is not divisible into {ph}x{pw} patches")
    return image.reshape(h // ph, ph, w // pw, pw, c).transpose(0, 2, 1, 3, 4)


def _to_unit_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 or [-1, 1] floats -> floats in [0, 1] for display."""
    if image.dtype == np.uint8:
        return image / 255.0
    return np.clip((np.asarray(image, np.float64) + 1) / 2, 0, 1)


# ----------------------------------------------------------------------------- pictures


def embedding_components_figure(components: np.ndarray, variance: np.ndarray, path: str) -> str:
    """The components (num, ph, pw, C) as RGB patches (each scaled to [0, 1]), 7 per row."""
    plt = _pyplot()
    rows, cols = _grid_shape(len(components), 7)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.5 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (comp, var) in enumerate(zip(components, variance, strict=True)):
        lo, hi = comp.min(), comp.max()
        img = (comp - lo) / max(hi - lo, 1e-12)
        ax = axes.flat[i]
        ax.imshow(img if img.shape[-1] == 3 else img.mean(-1), cmap="gray", interpolation="nearest")
        ax.set_title(f"PC{i + 1} {100 * var:.1f}%", fontsize=7)
    fig.suptitle(f"Patch-embedding filters: first {len(components)} principal components")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def position_similarity_figure(similarity: np.ndarray, path: str) -> str:
    """A grid of heat maps (gh x gw), one per patch, with a shared colour bar."""
    plt = _pyplot()
    gh, gw = similarity.shape[:2]
    size = min(0.6, 9.0 / max(gh, gw))
    fig, axes = plt.subplots(
        gh, gw, figsize=(size * gw + 1.4, size * gh + 0.9), squeeze=False, layout="constrained"
    )
    image = None
    for i in range(gh):
        for j in range(gw):
            ax = axes[i, j]
            image = ax.imshow(similarity[i, j], vmin=-1, vmax=1, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(str(i + 1), fontsize=6, rotation=0, labelpad=6)
            if i == gh - 1:
                ax.set_xlabel(str(j + 1), fontsize=6)
    fig.supxlabel("input patch column")
    fig.supylabel("input patch row")
    fig.suptitle("Position embedding similarity")
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def attention_distance_figure(distance: np.ndarray, path: str, image_px: int | None = None) -> str:
    """One dot per head (colour = head index), network depth (layer) on the x-axis."""
    plt = _pyplot()
    layers, heads = distance.shape
    fig, ax = plt.subplots(figsize=(6, 4.2))
    x = np.repeat(np.arange(1, layers + 1), heads)
    c = np.tile(np.arange(heads), layers)
    from matplotlib.colors import BoundaryNorm

    cmap = plt.get_cmap("tab20" if heads <= 20 else "viridis", heads)
    norm = BoundaryNorm(np.arange(heads + 1) - 0.5, heads)
    points = ax.scatter(x, distance.ravel(), c=c, cmap=cmap, norm=norm, s=18)
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(np.arange(1, layers + 1))
    ax.set_ylim(0, image_px or max(1.0, float(distance.max()) * 1.1))
    ax.set_title("Mean attention distance per head")
    fig.colorbar(points, ax=ax, label="head", ticks=np.arange(0, heads, max(1, heads // 12)))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def patch_grid_figure(image: np.ndarray, patch_px: tuple[int, int], path: str) -> str:
    """The image, then its patches laid out with gaps and numbered in sequence order."""
    plt = _pyplot()
    patches = patch_grid(_to_unit_rgb(image), patch_px)
    gh, gw = patches.shape[:2]
    fig = plt.figure(figsize=(4 + 0.45 * gw, max(3.5, 0.45 * gh) + 0.6))
    left = fig.add_axes((0.03, 0.1, 0.36, 0.78))
    left.imshow(_to_unit_rgb(image))
    left.set_title(f"input {image.shape[0]}x{image.shape[1]}")
    left.set_xlabel("pixels")
    right = fig.add_gridspec(gh, gw, left=0.45, right=0.98, bottom=0.1, top=0.88, wspace=0.1)
    for i in range(gh):
        for j in range(gw):
            ax = fig.add_subplot(right[i, j])
            ax.imshow(patches[i, j])
            ax.set_xticks([])
            ax.set_yticks([])
            if gh * gw <= 64:
                ax.set_title(str(i * gw + j + 1), fontsize=6, pad=1)
    fig.suptitle(f"{gh * gw} patches of {patch_px[0]}x{patch_px[1]} pixels ({gh}x{gw} grid)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def topk_figure(predictions: Sequence[dict[str, Any]], path: str, title: str = "") -> str:
    """Horizontal bars of the top-k probabilities: `predictions` as `predict.predict` returns them."""
    plt = _pyplot()
    labels = [p["label"] for p in predictions][::-1]
    probs = [p["probability"] for p in predictions][::-1]
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(labels) + 1.2))
    bars = ax.barh(range(len(labels)), probs, color="tab:blue")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    for bar, p in zip(bars, probs, strict=True):
        ax.text(min(p + 0.01, 0.9), bar.get_y() + bar.get_height() / 2, f"{p:.3f}", va="center")
    ax.set_title(title or f"top-{len(labels)} predictions")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- all of them


def paper_figures(
    model: Any,
    params: Any,
    out_dir: str,
    images: np.ndarray,
    image: np.ndarray | None = None,
    predictions: Sequence[dict[str, Any]] | None = None,
    batch: int = 16,
) -> dict[str, Any]:
    """Computes and draws every figure; returns {'arrays': {...}, 'files': {...}}.

    `images` (N, H, W, 3) in [-1, 1] at the params' resolution feed the attention distances; `image`
    (one of them, or another) is cut into patches; `predictions` (top-k for `image`) make the bar chart.
    Pure ViTs only for the embedding filters: a hybrid's patch embedding sees ResNet features, not RGB.
    """
    from vit_jax import visualize

    os.makedirs(out_dir, exist_ok=True)
    h, w = images.shape[1:3]
    grid = model.grid_size((h, w))
    arrays: dict[str, Any] = {}
    files: dict[str, str] = {}

    kernel = np.asarray(params["embedding"]["kernel"])
    if model.resnet_layers is None:
        comps, var = embedding_components(kernel)
        arrays.update(embedding_components=comps, embedding_variance=var)
        files["embedding_components"] = embedding_components_figure(
            comps, var, os.path.join(out_dir, "embedding_filters.png")
        )
    posemb = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
    sim = position_similarity(posemb, grid, model.has_class_token)
    arrays["position_similarity"] = sim
    files["position_similarity"] = position_similarity_figure(
        sim, os.path.join(out_dir, "position_similarity.png")
    )

    totals = None
    for start in range(0, len(images), batch):
        weights = visualize.attention_weights(model, params, images[start : start + batch])
        part = mean_attention_distance(weights, grid, model.stride, model.has_class_token)
        n = min(batch, len(images) - start)
        totals = part * n if totals is None else totals + part * n
    distance = totals / len(images)
    arrays["mean_attention_distance"] = distance
    files["mean_attention_distance"] = attention_distance_figure(
        distance, os.path.join(out_dir, "attention_distance.png"), image_px=max(h, w)
    )

    if image is not None:
        files["patch_grid"] = patch_grid_figure(
            image, model.stride, os.path.join(out_dir, "patch_grid.png")
        )
    if predictions:
        arrays["top_k"] = np.array([p["probability"] for p in predictions])
        files["top_k"] = topk_figure(predictions, os.path.join(out_dir, "top_k.png"))
    return {"arrays": arrays, "files": files}
