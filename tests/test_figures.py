"""The paper's figures: arrays with known properties, PNGs, and the `visualize figures` command."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vit_jax import checkpoint, figures, models, visualize


def test_embedding_components_recover_the_filters_subspace():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(4, 4, 3))
    v = rng.normal(size=(4, 4, 3))
    v -= u * (u * v).sum() / (u * u).sum()  # orthogonal to u
    a, b = rng.normal(size=64) * 10.0, rng.normal(size=64)
    kernel = np.stack([ai * u + bi * v for ai, bi in zip(a, b, strict=True)], axis=-1)
    comps, variance = figures.embedding_components(kernel, num=28)
    assert comps.shape == (28, 4, 4, 3) and variance.shape == (28,)
    np.testing.assert_allclose(np.linalg.norm(comps.reshape(28, -1), axis=1), 1.0, rtol=1e-9)
    cos = lambda x, y: abs((x * y).sum()) / np.linalg.norm(x) / np.linalg.norm(y)
    assert cos(comps[0], u) > 0.99 and cos(comps[1], v) > 0.99
    assert variance[0] > 0.9 and variance[:2].sum() == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(variance[2:], 0.0, atol=1e-12)  # rank-2 filters


def test_position_similarity_diagonal_and_smooth_embeddings():
    gh, gw, dim = 6, 5, 64
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    freqs = np.random.default_rng(1).normal(scale=0.3, size=(2, dim // 2))
    phase = rows.reshape(-1, 1) * freqs[0] + cols.reshape(-1, 1) * freqs[1]
    smooth = np.concatenate([np.sin(phase), np.cos(phase)], axis=-1)  # a smooth function of (r, c)
    cls = np.full((1, dim), 7.0)
    posemb = np.concatenate([cls, smooth])[None]  # (1, 1 + gh*gw, dim)
    sim = figures.position_similarity(posemb, (gh, gw), has_class_token=True)
    assert sim.shape == (gh, gw, gh, gw)
    np.testing.assert_allclose(np.einsum("ijij->ij", sim), 1.0, rtol=1e-12)
    for i in range(gh):
        for j in range(gw - 3):
            assert sim[i, j, i, j + 1] > sim[i, j, i, j + 3]
    for i in range(gh - 3):
        assert sim[i, 0, i + 1, 0] > sim[i, 0, i + 3, 0]
    with pytest.raises(ValueError, match="31 position embeddings do not make a 5x5 grid"):
        figures.position_similarity(posemb, (5, 5), has_class_token=False)


def _attention(n_tokens: int, kind: str, cls: bool, heads: int = 2, n: int = 3) -> np.ndarray:
    p = n_tokens
    if kind == "self":
        w = np.broadcast_to(np.eye(p), (n, heads, p, p))
    else:
        w = np.full((n, heads, p, p), 1.0 / p)
    if cls:  # the class token's row/column carry weight that must be left out and renormalised
        full = np.full((n, heads, p + 1, p + 1), 0.3)
        full[..., 1:, 1:] = 0.7 * w
        w = full
    return w


@pytest.mark.parametrize("cls", [False, True])
def test_mean_attention_distance_closed_forms(cls):
    # Attending only to itself: 0 pixels.
    self_only = [_attention(4, "self", cls)] * 3
    dist = figures.mean_attention_distance(self_only, (2, 2), (16, 16), cls)
    assert dist.shape == (3, 2)
    np.testing.assert_allclose(dist, 0.0, atol=1e-12)
    # Uniform on a 2x2 grid of 16px patches: from every patch 0, 16, 16, 16*sqrt(2) pixels.
    uniform = [_attention(4, "uniform", cls)]
    expected = 16 * (2 + np.sqrt(2)) / 4
    np.testing.assert_allclose(
        figures.mean_attention_distance(uniform, (2, 2), (16, 16), cls), expected
    )
    # Uniform on a 1 x n strip of p-pixel patches: mean |i - j| * p = p (n^2 - 1) / (3 n).
    n, p = 7, 8
    strip = [_attention(n, "uniform", cls)]
    np.testing.assert_allclose(
        figures.mean_attention_distance(strip, (1, n), (p, p), cls), p * (n * n - 1) / (3 * n)
    )


def test_patch_grid_cuts_row_major():
    image = np.arange(6 * 4 * 3).reshape(6, 4, 3)
    patches = figures.patch_grid(image, (3, 2))
    assert patches.shape == (2, 2, 3, 2, 3)
    np.testing.assert_array_equal(patches[1, 0], image[3:6, 0:2])
    np.testing.assert_array_equal(patches[0, 1], image[0:3, 2:4])
    with pytest.raises(ValueError, match="not divisible into 4x4 patches"):
        figures.patch_grid(image, (4, 4))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny class-token model (16px images, 4px patches: a 4x4 grid) saved in the published layout."""
    model = models.get_model(
        "testing", num_classes=3, patch_size=(4, 4), num_layers=2, num_heads=2, hidden_size=32
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)["params"]
    params = jax.tree.map(
        lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params
    )
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.npz")
    checkpoint.save(jax.device_get(params), path)
    return model, params, path


def _png_size(path):
    with Image.open(path) as im:
        return im.size


def test_paper_figures_arrays_and_pngs(tiny_checkpoint, tmp_path):
    model, params, _ = tiny_checkpoint
    images = np.asarray(jax.random.uniform(jax.random.key(2), (5, 16, 16, 3), minval=-1, maxval=1))
    predictions = [{"label": "a", "index": 0, "probability": 0.7}]
    result = figures.paper_figures(
        model, params, str(tmp_path), images, images[0], predictions, batch=2
    )
    arrays = result["arrays"]
    assert arrays["embedding_components"].shape == (28, 4, 4, 3)
    assert arrays["position_similarity"].shape == (4, 4, 4, 4)
    dist = arrays["mean_attention_distance"]
    assert dist.shape == (2, 2)
    # Between attending to itself only and to the farthest patch of a 4x4 grid of 4px patches.
    assert np.all(dist > 0) and np.all(dist < 4 * 3 * np.sqrt(2))
    # Averaging in batches of 2 equals one pass over all 5 images.
    weights = visualize.attention_weights(model, params, images)
    np.testing.assert_allclose(
        dist, figures.mean_attention_distance(weights, (4, 4), (4, 4), True), rtol=1e-6
    )
    names = {
        "embedding_components": "embedding_filters.png",
        "position_similarity": "position_similarity.png",
        "mean_attention_distance": "attention_distance.png",
        "patch_grid": "patch_grid.png",
        "top_k": "top_k.png",
    }
    assert {k: v.rsplit("/", 1)[1] for k, v in result["files"].items()} == names
    for path in result["files"].values():
        w, h = _png_size(path)
        assert 300 <= w <= 2000 and 150 <= h <= 2000, (path, w, h)


def test_figures_command(tiny_checkpoint, tmp_path, capsys):
    _, _, path = tiny_checkpoint
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    (photos / "broken.png").write_bytes(b"not a png")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    out = tmp_path / "figs"
    visualize.main(
        ["figures", "--checkpoint", path, "--images", str(photos), "--labels", str(labels),
         "--top_k", "3", "--out", str(out)]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert "could not read" in captured.err and "broken.png" in captured.err
    assert "mean attention distance over 3 images" in captured.out
    for name in ("embedding_filters", "position_similarity", "attention_distance", "patch_grid"):
        assert (out / f"{name}.png").exists()
    assert (out / "top_k.png").exists()

    # Default images: the embedded digits.
    visualize.main(["figures", "--checkpoint", path, "--num_images", "4", "--out", str(out)])
    assert "mean attention distance over 4 images" in capsys.readouterr().out


def test_figures_command_errors(tiny_checkpoint, tmp_path, capsys):
    _, _, path = tiny_checkpoint
    with pytest.raises(SystemExit) as e:
        visualize.main(["figures", "--checkpoint", path, "--images", str(tmp_path / "nothing")])
    assert e.value.code == 2
    assert "no readable images" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        visualize.main(["figures", "--checkpoint", str(tmp_path / "missing.npz")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


def test_hybrid_models_skip_the_rgb_filter_figure(tmp_path):
    model = models.get_model("testing", num_classes=2, resnet_layers=(1,), patch_size=(1, 1))
    images = np.zeros((1, 16, 16, 3), np.float32)
    params = model.init(jax.random.key(0), images, train=False)["params"]
    result = figures.paper_figures(model, params, str(tmp_path), images)
    assert "embedding_components" not in result["files"]
    assert result["arrays"]["mean_attention_distance"].shape == (model.num_layers, model.num_heads)
