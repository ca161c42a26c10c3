"""Attention rollout and maps."""

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vit_jax import checkpoint, models, visualize


def _model_and_params(shape=(48, 32)):
    model = models.get_model("testing", num_classes=3, num_layers=2, dropout_rate=0.0)
    params = model.init(jax.random.key(0), jnp.zeros((1, *shape, 3)))["params"]
    return model, params


def test_rollout_rows_are_distributions_and_map_has_grid_shape():
    model, params = _model_and_params()
    images = jax.random.uniform(jax.random.key(1), (2, 48, 32, 3), minval=-1, maxval=1)
    weights = visualize.attention_weights(model, params, images)
    assert len(weights) == 2 and weights[0].shape == (2, 2, 7, 7)  # 1 + 3x2 tokens, 2 heads
    rollout = visualize.attention_rollout(weights)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, rtol=1e-6)
    heat = visualize.rollout_map(rollout, True, (3, 2))
    assert heat.shape == (2, 3, 2) and np.allclose(heat.max(axis=(1, 2)), 1.0)
    per_head = visualize.class_token_attention(weights, (3, 2))
    assert per_head.shape == (2, 2, 3, 2)
    np.testing.assert_allclose(per_head.sum(axis=(2, 3)) + weights[-1][:, :, 0, 0], 1.0, rtol=1e-5)


def test_rollout_closed_forms():
    n = 5
    identity = [np.broadcast_to(np.eye(n), (1, 2, n, n))] * 3
    np.testing.assert_allclose(visualize.attention_rollout(identity)[0], np.eye(n))
    uniform = [np.full((1, 2, n, n), 1 / n)] * 2
    one = 0.5 / n + 0.5 * np.eye(n)  # one layer of uniform attention with the residual mixed in
    np.testing.assert_allclose(visualize.attention_rollout(uniform)[0], one @ one)


def test_cli_writes_an_overlay_of_the_image_size(tmp_path):
    _, params = _model_and_params((32, 32))
    ckpt = checkpoint.save(params, str(tmp_path / "m.npz"))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 70, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    out, heads = tmp_path / "map.png", tmp_path / "heads.png"
    visualize.main(
        [
            str(tmp_path / "in.png"),
            "--checkpoint",
            ckpt,
            "--out",
            str(out),
            "--heads_out",
            str(heads),
        ]
    )
    with Image.open(out) as im:
        assert im.size == (70, 90)
    with Image.open(heads) as im:
        assert im.size[0] > 200 and im.size[1] > 100
