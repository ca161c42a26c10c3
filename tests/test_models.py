"""Model family: parameter counts and names, shapes, dtypes, dropout, errors."""

import collections
import functools
import re
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models, parallel, summary, train
from vit_jax.variants import VARIANTS

# The reference's counts with a 1000-class head at 224px.
REFERENCE_COUNTS = {
    "testing": 21_390,
    "ViT-Ti_16": 5_717_416,
    "ViT-S_16": 22_050_664,
    "ViT-B_16": 86_567_656,
    "ViT-B_32": 88_224_232,
    "ViT-L_16": 304_326_632,
    "ViT-H_14": 632_045_800,
    "R50+ViT-B_16": 98_659_112,
}


@pytest.mark.parametrize("name,expected", sorted(REFERENCE_COUNTS.items()))
def test_parameter_counts_match_reference(name, expected):
    assert models.count_params(models.get_model(name, num_classes=1000)) == expected


def test_every_variant_builds_at_224():
    for name in VARIANTS:
        assert models.count_params(models.get_model(name, num_classes=10)) > 0, name


def test_block_names_and_shapes_are_the_published_layout():
    params = models.param_shapes(models.get_model("ViT-B_16", num_classes=1000))
    block = jax.tree.map(lambda x: x.shape, params["Transformer"]["encoderblock_0"])
    assert block == {
        "LayerNorm_0": {"scale": (768,), "bias": (768,)},
        "MultiHeadDotProductAttention_1": {
            "query": {"kernel": (768, 12, 64), "bias": (12, 64)},
            "key": {"kernel": (768, 12, 64), "bias": (12, 64)},
            "value": {"kernel": (768, 12, 64), "bias": (12, 64)},
            "out": {"kernel": (12, 64, 768), "bias": (768,)},
        },
        "LayerNorm_2": {"scale": (768,), "bias": (768,)},
        "MlpBlock_3": {
            "Dense_0": {"kernel": (768, 3072), "bias": (3072,)},
            "Dense_1": {"kernel": (3072, 768), "bias": (768,)},
        },
    }
    assert set(params) == {"embedding", "cls", "Transformer", "head"}
    assert params["embedding"]["kernel"].shape == (16, 16, 3, 768)
    assert params["cls"].shape == (1, 1, 768)
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 197, 768)
    assert set(params["Transformer"]) == {
        "posembed_input",
        "encoder_norm",
        *(f"encoderblock_{i}" for i in range(12)),
    }
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_hybrid_stem_names_are_the_published_layout():
    params = models.param_shapes(models.get_model("R50+ViT-B_16", num_classes=1000))
    shapes = jax.tree.map(lambda x: x.shape, params)
    assert shapes["conv_root"] == {"kernel": (7, 7, 3, 64)}
    assert shapes["gn_root"] == {"scale": (64,), "bias": (64,)}
    assert sorted(k for k in shapes if k.startswith("block")) == ["block1", "block2", "block3"]
    assert len(shapes["block3"]) == 9
    assert shapes["block1"]["unit1"]["conv_proj"] == {"kernel": (1, 1, 64, 256)}
    assert shapes["block3"]["unit1"]["conv2"] == {"kernel": (3, 3, 256, 256)}
    assert shapes["embedding"]["kernel"] == (1, 1, 1024, 768)
    assert shapes["Transformer"]["posembed_input"]["pos_embedding"] == (1, 197, 768)


def _init(model, shape=(2, 32, 32, 3), seed=0):
    images = jax.random.uniform(jax.random.key(seed), shape, minval=-1, maxval=1)
    params = model.init(jax.random.key(1), images, train=False)["params"]
    # The head is zero-initialised; randomise it so outputs carry information.
    if "head" in params:
        params["head"]["kernel"] = jax.random.normal(
            jax.random.key(2), params["head"]["kernel"].shape
        )
    return images, params


@pytest.mark.parametrize(
    "classifier,expected",
    [("token", (2, 7)), ("gap", (2, 7)), ("unpooled", (2, 4, 7)), ("token_unpooled", (2, 5, 7))],
)
def test_output_shape_per_classifier(classifier, expected):
    model = models.get_model("testing", num_classes=7, classifier=classifier)
    images, params = _init(model)
    out = model.apply({"params": params}, images)
    assert out.shape == expected and out.dtype == jnp.float32
    assert ("cls" in params) == (classifier in ("token", "token_unpooled"))


def test_testing_unpooled_variant_and_no_head():
    model = models.get_model("testing-unpooled", num_classes=None)
    images, params = _init(model)
    assert "head" not in params
    assert model.apply({"params": params}, images).shape == (2, 5, 10)


def test_representation_size_adds_tanh_pre_logits():
    model = models.get_model("testing", num_classes=3, representation_size=6)
    images, params = _init(model)
    assert params["pre_logits"]["kernel"].shape == (10, 6)
    features = models.get_model("testing", num_classes=None, representation_size=6).apply(
        {"params": {k: v for k, v in params.items() if k != "head"}}, images
    )
    assert features.shape == (2, 6) and np.all(np.abs(features) <= 1.0)


def test_non_square_images():
    model = models.get_model("testing", num_classes=4)
    images, params = _init(model, shape=(1, 32, 48, 3))
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 1 + 2 * 3, 10)
    assert model.apply({"params": params}, images).shape == (1, 4)
    assert model.grid_size((32, 48)) == (2, 3)


def test_hybrid_forward_stem_only():
    model = models.get_model("R+ViT-Ti_16", num_classes=5, num_layers=1)
    assert model.stride == (32, 32)
    images, params = _init(model, shape=(1, 64, 96, 3))
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 1 + 2 * 3, 192)
    out = model.apply({"params": params}, images)
    assert out.shape == (1, 5) and np.all(np.isfinite(out))


def test_bfloat16_compute_keeps_float32_params_and_logits():
    f32 = models.get_model("testing", num_classes=5, num_layers=2, hidden_size=32, mlp_dim=64)
    images, params = _init(f32)
    bf16 = f32.clone(dtype=jnp.bfloat16)
    assert jax.tree.map(lambda x: x.dtype, bf16.init(jax.random.key(1), images)["params"]) == (
        jax.tree.map(lambda x: x.dtype, params)
    )
    ref = f32.apply({"params": params}, images)
    out = bf16.apply({"params": params}, images)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.05 * float(np.abs(ref).max()))
    assert not np.array_equal(out, ref)  # it really computed in bfloat16


def test_dropout_only_when_training():
    model = models.get_model("testing", num_classes=5)  # dropout_rate=0.1
    images, params = _init(model)
    eval1 = model.apply({"params": params}, images, train=False)
    eval2 = model.apply({"params": params}, images, train=False)
    np.testing.assert_array_equal(eval1, eval2)
    train1 = model.apply(
        {"params": params}, images, train=True, rngs={"dropout": jax.random.key(1)}
    )
    train2 = model.apply(
        {"params": params}, images, train=True, rngs={"dropout": jax.random.key(2)}
    )
    assert not np.allclose(train1, eval1) and not np.allclose(train1, train2)
    no_dropout = model.clone(dropout_rate=0.0)
    np.testing.assert_allclose(
        no_dropout.apply({"params": params}, images, train=True), eval1, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_attention_paths_agree_and_weights_are_sown(monkeypatch, dtype, tol):
    """Three ways to attend: the CPU default (softmax normalised after the product with V), the
    softmax weights first (taken when the weights are asked for, or for attention dropout) and the
    fused kernel of GPU/TPU. Same outputs, same gradients."""
    model = models.get_model(
        "testing", num_classes=5, num_layers=2, hidden_size=16, num_heads=4, dtype=dtype
    )
    images, params = _init(model)
    assert not models.use_fused_attention()  # XLA:CPU: the einsum path is the default here

    def loss(p, sow):
        if sow:
            logits, state = model.apply({"params": p}, images, mutable=["intermediates"])
        else:
            logits, state = model.apply({"params": p}, images), None
        return jnp.sum(logits * jnp.arange(1.0, 6.0)), (logits, state)

    (_, (explicit, _)), grads = jax.value_and_grad(loss, has_aux=True)(params, False)
    (_, (sown, state)), grads_sown = jax.value_and_grad(loss, has_aux=True)(params, True)
    np.testing.assert_allclose(sown, explicit, rtol=tol, atol=tol)
    # Relative to the largest gradient: the key bias's true gradient is 0 (softmax ignores it).
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_sown))
    for g, g_sown in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_sown), strict=True):
        np.testing.assert_allclose(g / scale, g_sown / scale, atol=tol)
    fused = model.clone(attention="xla").apply({"params": params}, images)
    np.testing.assert_allclose(explicit, fused, rtol=tol, atol=tol)
    monkeypatch.setattr(models, "use_fused_attention", lambda: True)  # GPU/TPU: 'auto' is fused
    np.testing.assert_array_equal(model.apply({"params": params}, images), fused)
    weights = state["intermediates"]["Transformer"]["encoderblock_1"][
        "MultiHeadDotProductAttention_1"
    ]["attention_weights"][0]
    assert weights.shape == (2, 4, 5, 5)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)


def test_cudnn_flash_attention_is_asked_for_where_cudnn_has_it(monkeypatch):
    # JAX's implementation=None is XLA's attention on GPU too: cuDNN has to be asked for, and only
    # for the operands and GPUs its flash attention takes.
    pick = models.fused_attention_implementation
    assert pick(jnp.bfloat16, 64) is None  # this CPU
    gpu = types.SimpleNamespace(platform="gpu", compute_capability="9.0")  # H100/H200
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: [gpu])
    assert pick(jnp.bfloat16, 64) == pick(jnp.float16, 64) == "cudnn"
    assert pick(jnp.bfloat16, 80) == "cudnn"  # ViT-H/14
    assert pick(jnp.float32, 64) is None  # cuDNN's kernel takes no float32 operands
    assert pick(jnp.bfloat16, 12) is None  # not a multiple of 8
    assert pick(jnp.bfloat16, 256) == "cudnn" and pick(jnp.bfloat16, 264) is None
    gpu.compute_capability = "8.0"  # A100: head dims up to 128
    assert pick(jnp.bfloat16, 128) == "cudnn" and pick(jnp.bfloat16, 256) is None
    gpu.compute_capability = "7.5"  # T4: no flash attention in cuDNN
    assert pick(jnp.bfloat16, 64) is None
    gpu.compute_capability = "gfx90a"  # ROCm
    assert pick(jnp.bfloat16, 64) is None


def test_the_attention_setting_picks_the_kernel(monkeypatch):
    path = models.attention_path
    assert [path(a, jnp.bfloat16, 64) for a in ("auto", "xla", "einsum")] == [
        "einsum",  # this CPU
        "xla",
        "einsum",
    ]
    with pytest.raises(ValueError, match=r"^attention='cudnn' needs an NVIDIA GPU .* this is cpu"):
        path("cudnn", jnp.bfloat16, 64)
    with pytest.raises(ValueError, match=r"^unknown attention='flash'; expected one of auto, "):
        path("flash", jnp.float32, 64)
    with pytest.raises(ValueError, match=r"^unknown attention='flash'; expected one of auto, "):
        models.get_model("testing", attention="flash")
    model = models.get_model("ViT-B_16", dtype=jnp.bfloat16)  # head dim 64; built, not initialised
    assert (
        model.attention_path() == "einsum"
        and model.clone(attention="xla").attention_path() == "xla"
    )
    gpu = types.SimpleNamespace(platform="gpu", compute_capability="9.0", device_kind="H100")
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: [gpu])
    monkeypatch.setattr(models, "use_fused_attention", lambda: True)
    assert path("auto", jnp.bfloat16, 64) == path("cudnn", jnp.bfloat16, 64) == "cudnn"
    assert path("auto", jnp.float32, 64) == "xla"  # cuDNN's kernel takes no float32 operands
    assert path("xla", jnp.bfloat16, 64) == "xla" and path("einsum", jnp.bfloat16, 64) == "einsum"
    with pytest.raises(ValueError, match=r"this is H100 with float32 compute and head dim 64: use"):
        path("cudnn", jnp.float32, 64)
    assert model.attention_path() == "cudnn"


def test_default_compute_dtype_is_bfloat16_where_matrix_units_run_it(monkeypatch):
    auto = models.default_compute_dtype
    assert auto() == jnp.float32  # this CPU, although it has AVX512-BF16
    bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
    device = types.SimpleNamespace(platform="tpu")
    assert auto(device) == bf16
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: [device])
    assert auto() == bf16
    device.platform = "gpu"
    for capability, dtype in [("9.0", bf16), ("8.9", bf16), ("8.0", bf16), ("7.5", f32)]:
        device.compute_capability = capability
        assert auto() == dtype, capability
    device.compute_capability = "gfx942"  # ROCm MI300: untested here, so float32
    assert auto() == f32


def test_attention_falls_back_to_xla_when_cudnn_refuses(monkeypatch):
    model = models.get_model(
        "testing", num_classes=5, num_layers=2, hidden_size=16, num_heads=2, dtype=jnp.bfloat16
    )
    images, params = _init(model)
    monkeypatch.setattr(models, "use_fused_attention", lambda: True)
    xla = model.apply({"params": params}, images)
    # Asked for cuDNN on this CPU, jax.nn.dot_product_attention raises "cuDNN is not detected."
    monkeypatch.setattr(models, "fused_attention_implementation", lambda *a: "cudnn")
    with pytest.warns(
        RuntimeWarning, match=r"cuDNN attention is not available here \(cuDNN is not"
    ):
        fallback = model.apply({"params": params}, images)
    np.testing.assert_array_equal(fallback, xla)
    # Asked for by name, cuDNN is not replaced: one clear error instead.
    with pytest.raises(
        ValueError, match=r"^attention='cudnn': cuDNN refused this call \(cuDNN is not detected"
    ):
        model.clone(attention="cudnn").apply({"params": params}, images)


def test_odd_lengths_are_padded_with_a_token_no_query_attends_to():
    # JAX's cuDNN attention cannot be differentiated at odd lengths (a class token makes every
    # ViT's odd), so they are padded by one masked token; the same call through XLA's form here.
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 2, 8))
    weights = jax.random.normal(jax.random.key(1), (2, 5, 2, 8))

    def loss(attention, q, k, v):
        return (attention(q, k, v) * weights).sum()

    plain, padded = jax.nn.dot_product_attention, models.even_length_attention
    assert "pad" in str(jax.make_jaxpr(padded)(q, k, v))
    assert "pad" not in str(jax.make_jaxpr(padded)(q[:, :4], k[:, :4], v[:, :4]))
    np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-6)
    grads = jax.grad(loss, argnums=(1, 2, 3))(padded, q, k, v)
    for got, want in zip(grads, jax.grad(loss, argnums=(1, 2, 3))(plain, q, k, v), strict=True):
        assert got.shape == want.shape == (2, 5, 2, 8)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(grads[1]).max()) > 0.1  # the keys' gradient is not all zero
    # A caller's own mask (here 3 of the 5 keys) holds with the padding too.
    lengths = jnp.array([3, 3], jnp.int32)
    masked = plain(q, k, v, key_value_seq_lengths=lengths)
    assert not np.allclose(masked, plain(q, k, v), atol=1e-3)
    np.testing.assert_allclose(padded(q, k, v, lengths), masked, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("remat", [False, True])
def test_the_encoder_pads_an_odd_sequence_once_for_cudnn(monkeypatch, remat):
    # With cuDNN's attention picked (here: the same masked call run in XLA's form), the encoder
    # makes its 5 tokens 6 for all blocks at once, and the model computes what the einsums compute.
    # The last block asks one query, the class token's, in XLA's attention (cuDNN's cannot be
    # differentiated at odd lengths), with the pad masked too.
    monkeypatch.setattr(models, "use_fused_attention", lambda: True)
    monkeypatch.setattr(models, "fused_attention_implementation", lambda dtype, head_dim: "cudnn")
    calls = []
    real = jax.nn.dot_product_attention

    def spy(q, k, v, *, key_value_seq_lengths=None, implementation=None):
        calls.append((q.shape[1], implementation, key_value_seq_lengths))
        return real(q, k, v, key_value_seq_lengths=key_value_seq_lengths)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    model = models.get_model(
        "testing", num_classes=5, num_layers=2, hidden_size=16, num_heads=4, dropout_rate=0.0,
        remat=remat,
    )  # fmt: skip
    images, params = _init(model)
    assert model.num_tokens(32) == 5
    calls.clear()

    def loss(p, attention):
        logits = model.clone(attention=attention).apply({"params": p}, images, train=True)
        return jnp.sum(logits * jnp.arange(1.0, 6.0)), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params, "auto")
    # The 6th token is masked (were it not, the logits below would differ).
    assert {c[:2] for c in calls} == {(6, "cudnn"), (1, None)}
    assert all(c[2] is not None for c in calls)
    (_, want), want_grads = jax.value_and_grad(loss, has_aux=True)(params, "einsum")
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
    # Relative to the largest gradient: the key bias's true gradient is 0 (softmax ignores it).
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads))
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g / scale, w / scale, atol=1e-5)
    # The one pad is the (N, L, D) sequence's, none of q, k or v in a layer.
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, images))(params))
    assert re.findall(r"\S+:(\S+) = pad\[", jaxpr) == ["f32[2,6,16]"]
    # Attention maps are computed by the einsums, over the 5 real tokens only.
    _, state = model.apply({"params": params}, images, mutable=["intermediates"])
    maps = jax.tree.leaves(state["intermediates"])
    assert len(maps) == 2 and all(m.shape == (2, 4, 5, 5) for m in maps)


def test_patch_embedding_is_the_strided_convolution():
    x = jax.random.normal(jax.random.key(0), (2, 12, 8, 3))
    conv = nn.Conv(5, kernel_size=(4, 2), strides=(4, 2), padding="VALID")
    variables = conv.init(jax.random.key(1), x)
    variables = jax.tree.map(lambda p: p + 0.1, variables)  # a non-zero bias too
    ours = models.PatchEmbedding(5, (4, 2)).apply(variables, x)
    assert ours.shape == (2, 3, 4, 5) and ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, conv.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_bfloat16_matmuls_accumulate_in_float32():
    lhs = jnp.full((1, 4096), 1.0 + 2.0**-7, jnp.bfloat16)  # exactly representable in bfloat16
    rhs = jnp.ones((4096, 1), jnp.bfloat16)
    dims = (((1,), (0,)), ((), ()))
    out = models.dot_general(jnp.bfloat16)(lhs, rhs, dims)
    assert out.dtype == jnp.float32 and float(out[0, 0]) == 4096 * (1.0 + 2.0**-7)
    assert models.dot_general(jnp.float32) is jax.lax.dot_general


# (dimension_numbers, lhs shape, rhs shape) of the model's products.
DOT_PRODUCTS = [
    ((((2,), (0,)), ((), ())), (2, 5, 6), (6, 7)),  # Dense
    ((((2,), (0,)), ((), ())), (2, 16, 12), (12, 3)),  # Dense, kernel gradient computed transposed
    ((((2, 3), (0, 1)), ((), ())), (2, 5, 3, 4), (3, 4, 6)),  # attention "out" DenseGeneral
    ((((3,), (3,)), ((0, 1), (0, 1))), (2, 3, 5, 4), (2, 3, 6, 4)),  # q k^T
    ((((3,), (2,)), ((0, 1), (0, 1))), (2, 3, 5, 6), (2, 3, 6, 4)),  # weights v
    # More tokens than twice the head width: dK and dV computed with their last two axes swapped.
    ((((3,), (3,)), ((0, 1), (0, 1))), (2, 3, 11, 4), (2, 3, 11, 4)),  # q k^T
    ((((3,), (2,)), ((0, 1), (0, 1))), (2, 3, 11, 11), (2, 3, 11, 4)),  # weights v
]


@pytest.mark.parametrize("dims,lhs_shape,rhs_shape", DOT_PRODUCTS)
def test_bfloat16_dot_gradients_match_float32(dims, lhs_shape, rhs_shape):
    keys = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(keys[0], lhs_shape).astype(jnp.bfloat16)
    rhs = jax.random.normal(keys[1], rhs_shape).astype(jnp.bfloat16)
    out = jax.lax.dot_general(lhs.astype(jnp.float32), rhs.astype(jnp.float32), dims)
    g = jax.random.normal(keys[2], out.shape)
    mixed = models.dot_general(jnp.bfloat16)
    np.testing.assert_allclose(mixed(lhs, rhs, dims), out, rtol=1e-5, atol=1e-5)
    _, vjp = jax.vjp(lambda a, b: mixed(a, b, dims), lhs, rhs)
    _, vjp32 = jax.vjp(
        lambda a, b: jax.lax.dot_general(a, b, dims), *(x.astype(jnp.float32) for x in (lhs, rhs))
    )
    for ours, ref in zip(vjp(g), vjp32(g), strict=True):
        assert ours.dtype == jnp.bfloat16 and ours.shape == ref.shape
        # bfloat16 rounding of the cotangent and of the result: ~2^-8 relative.
        np.testing.assert_allclose(
            ours.astype(jnp.float32), ref, atol=0.02 * float(jnp.abs(ref).max())
        )


@pytest.mark.parametrize("dims,lhs_shape,rhs_shape", DOT_PRODUCTS)
def test_float32_backward_products_need_no_transpose(dims, lhs_shape, rhs_shape):
    # mixed_dot_general in float32 (the attention's products): lax.dot_general's gradients, with no
    # transpose after a product (JAX's own rule transposes dV, and a kernel gradient, after one).
    keys = jax.random.split(jax.random.key(0), 3)
    lhs, rhs = jax.random.normal(keys[0], lhs_shape), jax.random.normal(keys[1], rhs_shape)
    g = jax.random.normal(keys[2], jax.lax.dot_general(lhs, rhs, dims).shape)
    _, vjp = jax.vjp(lambda a, b: models.mixed_dot_general(a, b, dims), lhs, rhs)
    _, vjp_lax = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dims), lhs, rhs)
    for ours, ref in zip(vjp(g), vjp_lax(g), strict=True):
        assert ours.dtype == jnp.float32
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    primitives = {e.primitive.name for e in jax.make_jaxpr(vjp)(g).jaxpr.eqns}
    assert "dot_general" in primitives and "transpose" not in primitives
    jax_rule = {e.primitive.name for e in jax.make_jaxpr(vjp_lax)(g).jaxpr.eqns}
    assert ("transpose" in jax_rule) == (dims[0] != ((3,), (3,)))  # all but q k^T transpose


def test_float32_attention_takes_mixed_dot_general_for_both_products():
    attn = models.MultiHeadDotProductAttention(num_heads=2, attention="einsum")
    x = jax.random.normal(jax.random.key(0), (1, 5, 8))
    variables = attn.init(jax.random.key(1), x, deterministic=True)
    jaxpr = jax.make_jaxpr(lambda v: attn.apply(v, x, deterministic=True))(variables)
    assert [e.primitive.name for e in jaxpr.jaxpr.eqns].count("custom_vjp_call") == 2


@pytest.mark.parametrize(
    "features,in_axes,shape", [((4, 3), 1, (2, 5, 12)), ((12,), 2, (2, 5, 4, 3))]
)
def test_projection_is_flax_dense_general_with_its_bias_apart(features, in_axes, shape):
    # The attention's layers: nn.DenseGeneral's parameters, initial values included, and its output
    # as product + bias; a shift of the input reaches the bias through the kernel.
    x = jax.random.normal(jax.random.key(0), shape)
    shift = jax.random.normal(jax.random.key(1), shape[-in_axes:])
    inits = dict(kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.normal(1))
    ours = models.Projection(features=features, in_axes=in_axes, **inits)
    flax_layer = nn.DenseGeneral(features, axis=tuple(range(-in_axes, 0)), **inits)
    variables = ours.init(jax.random.key(2), x)
    jax.tree.map(np.testing.assert_array_equal, variables, flax_layer.init(jax.random.key(2), x))
    y, bias = ours.apply(variables, x)
    assert y.shape == (*shape[:-in_axes], *features) and bias.shape == features
    np.testing.assert_allclose(y + bias, flax_layer.apply(variables, x), rtol=1e-6, atol=1e-6)
    y, bias = ours.apply(variables, x, shift)
    np.testing.assert_allclose(y + bias, flax_layer.apply(variables, x + shift), atol=1e-5)


def _reference_attention(p, x, mask=None):
    """The reference's self-attention, every bias where it adds it: (N, L, D) -> (N, L, D)."""
    q, k, v = (
        jnp.einsum("nld,dhk->nlhk", x, p[name]["kernel"]) + p[name]["bias"]
        for name in ("query", "key", "value")
    )
    logits = jnp.einsum("nqhk,nlhk->nhql", q, k) / np.sqrt(q.shape[-1])
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:  # flax's Dropout: kept weights scaled by 1 / keep
        weights = jnp.where(mask[0], weights / mask[1], 0.0)
    y = jnp.einsum("nhql,nlhk->nqhk", weights, v)
    return jnp.einsum("nqhk,hkd->nqd", y, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("attention,dropout", [("einsum", 0.0), ("xla", 0.0), ("einsum", 0.5)])
def test_attention_biases_the_softmax_ignores_or_carries_are_moved(attention, dropout):
    # No key bias (the softmax cancels it), the value bias through the out layer (the weights sum
    # to 1), except under attention dropout: the reference's outputs and gradients all the same.
    heads, n, length, d = 2, 2, 5, 8
    attn = models.MultiHeadDotProductAttention(
        num_heads=heads, dropout_rate=dropout, attention=attention
    )
    x = jax.random.normal(jax.random.key(0), (n, length, d))
    params = attn.init(jax.random.key(1), x, deterministic=True)["params"]
    keys = iter(jax.random.split(jax.random.key(2), 4))
    for name in ("query", "key", "value", "out"):  # biases as large as the rest
        params[name]["bias"] = jax.random.normal(next(keys), params[name]["bias"].shape)
    rng = jax.random.key(3)
    mask = None
    if dropout:
        mask = (jax.random.bernoulli(rng, 1 - dropout, (n, heads, length, length)), 1 - dropout)

    def ours(p):
        return attn.apply({"params": p}, x, deterministic=not dropout, rng=rng)

    np.testing.assert_allclose(
        ours(params), _reference_attention(params, x, mask), rtol=1e-5, atol=1e-5
    )
    cotangent = jax.random.normal(jax.random.key(4), (n, length, d))
    grads = jax.grad(lambda p: jnp.sum(ours(p) * cotangent))(params)
    ref = jax.grad(lambda p: jnp.sum(_reference_attention(p, x, mask) * cotangent))(params)
    # The reference's key-bias gradient is float rounding: 0 in exact arithmetic, 0 here.
    assert float(jnp.abs(ref["key"]["bias"]).max()) < 1e-5
    np.testing.assert_array_equal(grads["key"]["bias"], 0.0)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
    # Bias adds over (N*L, heads, head_dim) activations: the query's, and the value's under dropout.
    jaxpr = jax.make_jaxpr(ours)(params).jaxpr
    adds = [e for e in jaxpr.eqns if e.primitive.name == "add"]
    assert sum(e.outvars[0].aval.shape == (n * length, heads, d // heads) for e in adds) == (
        2 if dropout else 1
    )


def _token_axes_kept(x: jax.Array, dtype: object, feature_axes: int = 1) -> jax.Array:
    """`models.dense_input` as it was before: every Dense layer's input as it comes, (N, L, ...)."""
    return x


def test_float32_mlp_weight_gradient_reads_its_cotangent_in_place(monkeypatch):
    # On (N, L, D) activations a Dense kernel's gradient contracts N and L, and XLA:CPU copies the
    # MLP's (tokens, mlp_dim) cotangent transposed for it (f32[mlp_dim, tokens]); on the (N*L, D)
    # tokens of `models.dense_input` it reads it in place.
    model = models.get_model(
        "ViT-Ti_16", num_classes=5, num_layers=2, hidden_size=64, num_heads=2, mlp_dim=256,
        dropout_rate=0.0,
    )  # fmt: skip
    images = jnp.zeros((8, 112, 112, 3))  # 8 images of 50 tokens: 400 (the first block's)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), images[:1], train=False))

    def transposed_cotangents() -> list[str]:
        loss = lambda p: jnp.sum(model.apply(p, images, train=True) ** 2)
        text = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
        return re.findall(r"f32\[256,400\]", text)

    assert transposed_cotangents() == []
    monkeypatch.setattr(models, "dense_input", _token_axes_kept)
    assert transposed_cotangents()  # the (N, L, D) layers' copy


def test_flat_dense_inputs_change_no_number():
    # The same parameters, outputs, attention weights and gradients as Dense layers on (N, L, D).
    model = models.get_model("testing", num_classes=3, num_layers=2, dropout_rate=0.1)
    images, params = _init(model, (3, 32, 32, 3))

    def run():
        def loss(p):
            logits = model.apply(
                {"params": p}, images, train=True, rngs={"dropout": jax.random.key(3)}
            )
            return jnp.sum(logits**2)

        _, sown = model.apply({"params": params}, images, mutable=["intermediates"])
        return jax.value_and_grad(loss)(params), jax.tree.leaves(sown)

    ours = run()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "dense_input", _token_axes_kept)
        theirs = run()
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(ours[0][0]) > 0 and len(ours[1]) == 2  # a loss, and both layers' weights


def test_bfloat16_dense_layers_keep_their_token_axes_on_xla_cpu():
    # XLA:CPU runs a 2-D bfloat16 product contracting both operands' first axes on a kernel without
    # bfloat16, and the step fails when it runs: bfloat16 layers are not flattened.
    x = jnp.zeros((2, 5, 8), jnp.bfloat16)
    assert models.dense_input(x, jnp.bfloat16).shape == (2, 5, 8)
    assert models.dense_input(x, jnp.float32).shape == (10, 8)
    heads = x.reshape(2, 5, 2, 4)
    assert models.dense_input(heads, jnp.float32, feature_axes=2).shape == (10, 2, 4)
    model = models.get_model(
        "testing", num_classes=3, num_layers=1, dropout_rate=0.0, dtype=jnp.bfloat16
    )
    images, params = _init(model, (4, 32, 32, 3))
    loss = lambda p: jnp.sum(model.apply({"params": p}, images, train=True) ** 2)
    grads = jax.jit(jax.grad(loss))(params)  # compiled and run on XLA:CPU
    kernel = grads["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
    assert bool(jnp.all(jnp.isfinite(kernel))) and float(jnp.abs(kernel).max()) > 0


def _relative_error(ours: object, ref: object) -> float:
    """||ours - ref|| / ||ref|| over every leaf of two trees of arrays, in float64."""
    pairs = list(zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True))
    diff = sum(np.sum((np.float64(a) - np.float64(b)) ** 2) for a, b in pairs)
    return float(np.sqrt(diff / sum(np.sum(np.float64(b) ** 2) for _, b in pairs)))


def test_accelerator_dense_layers_are_plain_bfloat16_products_of_flat_tokens(monkeypatch):
    # On GPUs and TPUs a bfloat16 Dense layer is a plain product on (tokens, features): bfloat16
    # result, float32 accumulation inside the kernel. Here XLA:CPU runs that program.
    lhs = jnp.full((1, 4096), 1.0 + 2.0**-7, jnp.bfloat16)
    rhs = jnp.ones((4096, 1), jnp.bfloat16)
    monkeypatch.setattr(models, "on_xla_cpu", lambda: False)
    assert models.dot_general(jnp.bfloat16) is jax.lax.dot_general
    out = models.dot_general(jnp.bfloat16)(lhs, rhs, (((1,), (0,)), ((), ())))
    assert out.dtype == jnp.bfloat16 and float(out[0, 0]) == 4096 * (1.0 + 2.0**-7)  # 4128
    assert models.dense_input(jnp.zeros((2, 5, 8), jnp.bfloat16), jnp.bfloat16).shape == (10, 8)

    def loss_and_grads(dtype: object, cpu: bool):
        monkeypatch.setattr(models, "on_xla_cpu", lambda: cpu)
        model = models.get_model(
            "ViT-Ti_16", num_classes=10, num_layers=2, dropout_rate=0.0, dtype=dtype
        )
        images, params = _init(model, (4, 64, 64, 3))
        params["head"]["kernel"] *= 0.02
        labels = jnp.arange(4)

        def loss(p):
            logits = model.apply({"params": p}, images, train=True)
            return train.cross_entropy(logits, labels), logits

        fn = jax.value_and_grad(loss, has_aux=True)
        dots = [e for e in jax.make_jaxpr(fn)(params).eqns if e.primitive.name == "dot_general"]
        return jax.jit(fn)(params), dots

    with jax.default_matmul_precision("highest"):
        ref, _ = loss_and_grads(jnp.float32, cpu=True)
    accel, accel_dots = loss_and_grads(jnp.bfloat16, cpu=False)
    cpu, cpu_dots = loss_and_grads(jnp.bfloat16, cpu=True)

    # The products without batch axes (Dense layers, patch embedding; the attention's have batch
    # axes): bfloat16 results here, float32 ones in the XLA:CPU program.
    def low(dots: list) -> list:
        unbatched = [e for e in dots if e.params["dimension_numbers"][1] == ((), ())]
        return [e.outvars[0].aval.dtype for e in unbatched if e.invars[0].aval.dtype != "float32"]

    assert set(low(accel_dots)) == {jnp.dtype(jnp.bfloat16)} and len(low(accel_dots)) >= 12
    assert set(low(cpu_dots)) == {jnp.dtype(jnp.float32)} and len(low(cpu_dots)) >= 12
    # Both programs stay as close to float32: logits and gradients within 2 % (measured: 0.76 and
    # 1.2 % for this program, 0.73 and 1.0 % for XLA:CPU's), and they are different programs.
    for ours in (accel, cpu):
        assert _relative_error(ours[0][1], ref[0][1]) < 0.02
        assert _relative_error(ours[1], ref[1]) < 0.02
        assert abs(float(ours[0][0]) - float(ref[0][0])) < 0.01 * float(ref[0][0])
    assert _relative_error(accel[1], cpu[1]) > 1e-4


def _dot_operand_dtypes(jaxpr: jax.extend.core.Jaxpr) -> list[tuple[str, str]]:
    """The operand dtypes of every dot_general in `jaxpr` and the jaxprs nested in it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else (p,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _dot_operand_dtypes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _dot_operand_dtypes(sub)
    return found


def test_bfloat16_backward_products_take_bfloat16_operands():
    # A float32 x bfloat16 product runs at the float32 rate on XLA:CPU: the backward pass of a bfloat16
    # model must round its cotangents, not mix them with bfloat16 operands.
    model = models.get_model(
        "testing", num_classes=5, num_layers=2, dropout_rate=0.0, dtype=jnp.bfloat16
    )
    images, params = _init(model)
    loss = lambda p: jnp.sum(model.apply({"params": p}, images, train=True) ** 2)
    dtypes = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    # Per layer q, k, v, qk^T, weights-v, out and 2 MLP products, plus the patch embedding: 17
    # bfloat16 products, each run once forward and twice backward. In float32: the head, and per
    # layer the value bias carried into the out layer's bias (a vector times the out kernel).
    assert collections.Counter(dtypes) == {
        ("bfloat16", "bfloat16"): 3 * 17,
        ("float32", "float32"): 3 * (1 + 2),
    }


def test_remat_changes_nothing():
    model = models.get_model("testing", num_classes=5, num_layers=3, dropout_rate=0.0)
    images, params = _init(model)
    loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, images, train=True) ** 2)
    l1, g1 = jax.value_and_grad(loss(model))(params)
    l2, g2 = jax.value_and_grad(loss(model.clone(remat=True)))(params)
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    # The scanned backward pass adds the same terms in another order: equal up to float32 rounding
    # of the gradient's scale (some leaves, e.g. the key bias, are exactly 0 plus rounding noise).
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g1))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * scale), g1, g2
    )
    assert jax.tree.structure(g1) == jax.tree.structure(g2)


def test_remat_draws_the_same_dropout_masks():
    model = models.get_model("testing", num_classes=5, num_layers=2, dropout_rate=0.5)
    images, params = _init(model)

    def run(m, seed):
        rngs = {"dropout": jax.random.key(seed)}
        return m.apply({"params": params}, images, train=True, rngs=rngs)

    remat = model.clone(remat=True)
    # Equal up to float32 rounding of the logits' scale (XLA fuses the scanned blocks otherwise, and
    # one logit of 0.08 among logits of 6.5 came out 2e-6 apart with jax 0.12); another mask would
    # change them by about their own size.
    want = run(model, 0)
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(run(remat, 0), want, rtol=1e-5, atol=1e-6 * scale)
    assert not np.allclose(run(remat, 0), run(remat, 1))  # the masks do depend on the rng
    # Evaluation passes are never differentiated: they run the plain blocks.
    np.testing.assert_array_equal(
        remat.apply({"params": params}, images, train=False),
        model.apply({"params": params}, images, train=False),
    )


@pytest.mark.parametrize("remat", [False, True])
def test_a_class_token_head_runs_the_last_block_on_the_class_token_alone(monkeypatch, remat):
    # The head reads the class token only, so the last block computes that token's output alone
    # (one query; every token still gives keys and values): the same logits and gradients as a
    # full last block, up to float rounding, with its MLP on N tokens instead of N*L.
    model = models.get_model(
        "testing", num_classes=5, num_layers=2, hidden_size=16, num_heads=4, mlp_dim=24,
        dropout_rate=0.0, remat=remat,
    )  # fmt: skip
    images, params = _init(model)  # 2 images of 4 patches + the class token
    weights = jnp.arange(1.0, 6.0)

    def run(m, params=params):
        loss = lambda p: jnp.sum(m.apply({"params": p}, images, train=True) * weights)
        jaxpr = str(jax.make_jaxpr(loss)(params))
        mlp_rows = sorted(set(re.findall(r":f32\[(\d+),24\] = dot_general", jaxpr)))
        return jax.value_and_grad(loss)(params), mlp_rows

    (loss, grads), rows = run(model)
    assert rows == ["10", "2"]  # the first block's 2*5 tokens, the last block's 2 class tokens
    with monkeypatch.context() as mp:
        mp.setattr(models.VisionTransformer, "_class_token_only", lambda self: False)
        (want_loss, want_grads), want_rows = run(model)
    assert want_rows == ["10"]
    # Two programs whose products run on different kernels (one row per image, or all five) round
    # differently: 1.2e-6 apart on jax 0.8.1 on a Xeon with AMX, 8 units in the last place.
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads))
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g / scale, w / scale, atol=1e-6)
    # Heads that read every token keep full blocks; so do calls that keep the attention maps.
    gap = model.clone(classifier="gap")
    assert run(gap, _init(gap)[1])[1] == ["8"]
    _, state = model.apply({"params": params}, images, mutable=["intermediates"])
    assert [m.shape for m in jax.tree.leaves(state)] == [(2, 4, 5, 5)] * 2


def test_remat_shrinks_the_training_step_memory():
    """What remat is for: XLA's temporary buffers of a compiled gradient step get smaller."""
    model = models.get_model(
        "testing", num_classes=5, num_layers=6, hidden_size=32, mlp_dim=128, dropout_rate=0.0
    )
    images, params = _init(model, shape=(16, 64, 64, 3))

    def temp_bytes(m: nn.Module) -> int:
        loss = lambda p: jnp.sum(m.apply({"params": p}, images, train=True) ** 2)
        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain, remat = temp_bytes(model), temp_bytes(model.clone(remat=True))
    assert remat < 0.6 * plain, (remat, plain)


def test_gelu_is_flax_gelu_with_an_exact_slope():
    x = jnp.linspace(-10, 10, 20001, dtype=jnp.float32)
    np.testing.assert_array_equal(models.gelu(x), nn.gelu(x))  # the forward pass, bit for bit
    slope = jax.grad(lambda x: models.gelu(x).sum())
    np.testing.assert_allclose(slope(x), jax.grad(lambda x: nn.gelu(x).sum())(x), atol=2e-6)
    np.testing.assert_allclose(
        slope(jnp.array([0.0, 1.0, -3.0])), [0.5, 1.082964, -0.011584], atol=1e-6
    )
    # bfloat16: the slope is computed in float32, then rounded once (autodiff of nn.gelu in
    # bfloat16 is 4x further off: 0.016).
    xb = x.astype(jnp.bfloat16)
    np.testing.assert_array_equal(models.gelu(xb), nn.gelu(xb))
    got = jax.grad(lambda x: models.gelu(x).astype(jnp.float32).sum())(xb)
    assert got.dtype == jnp.bfloat16
    exact = jax.grad(lambda x: nn.gelu(x).sum())(xb.astype(jnp.float32))
    np.testing.assert_allclose(got.astype(np.float32), exact, rtol=2**-8, atol=2**-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_position_embedding_sum_and_gradients_are_the_plain_ones(dtype, monkeypatch):
    kx, kp, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (4, 5, 8), dtype)
    pe = jax.random.normal(kp, (1, 5, 8), jnp.float32)
    g = jax.random.normal(kg, (4, 5, 8), dtype)
    out, vjp = jax.vjp(models.add_position_embedding, x, pe)
    plain_out, plain_vjp = jax.vjp(lambda x, pe: x + pe.astype(x.dtype), x, pe)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, plain_out)
    (g_x, g_pe), (plain_g_x, plain_g_pe) = vjp(g), plain_vjp(g)
    np.testing.assert_array_equal(g_x, plain_g_x)
    assert g_pe.dtype == jnp.float32 and g_pe.shape == (1, 5, 8)
    np.testing.assert_allclose(g_pe, np.asarray(g, np.float64).sum(0, keepdims=True), rtol=1e-6)
    # The plain sum of bfloat16 cotangents rounds to bfloat16; this one accumulates in float32.
    tol = {"rtol": 1e-6} if dtype == jnp.float32 else {"rtol": 2**-7, "atol": 2**-6}
    np.testing.assert_allclose(g_pe, plain_g_pe, **tol)
    # What keeps XLA's GPU layout assignment off a batch-minor token stream (see the docstring):
    # the batch sum reads its operand through an optimization barrier. (No GPU compiles here.)
    # XLA:CPU sums the rows with adds instead of its slow reduction over a leading axis.
    jaxpr = str(jax.make_jaxpr(lambda g: vjp(g)[1])(g))
    assert "optimization_barrier" in jaxpr and "reduce_sum" not in jaxpr
    monkeypatch.setattr(models, "on_xla_cpu", lambda: False)
    _, vjp_elsewhere = jax.vjp(models.add_position_embedding, x, pe)
    jaxpr = str(jax.make_jaxpr(lambda g: vjp_elsewhere(g)[1])(g))
    np.testing.assert_allclose(vjp_elsewhere(g)[1], g_pe, rtol=1e-6)
    assert "optimization_barrier" in jaxpr and "reduce_sum" in jaxpr


@pytest.mark.parametrize("n", [1, 2, 8, 9, 17, 64])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sum_rows_is_the_float32_sum_over_the_leading_axis(n, dtype):
    rows = jax.random.normal(jax.random.key(n), (n, 300), jnp.float32).astype(dtype)
    got = models.sum_rows(rows)
    assert got.dtype == jnp.float32 and got.shape == (300,)
    exact = np.asarray(rows.astype(jnp.float32), np.float64).sum(0)
    np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-5)


def test_gelu_keeps_only_its_input_for_the_backward_pass(monkeypatch):
    """Through nn.gelu, XLA keeps each MLP activation's tanh for the backward pass as well: the
    compiled training step holds more temporaries."""
    model = models.get_model(
        "ViT-Ti_16", num_classes=5, num_layers=2, hidden_size=64, num_heads=2, mlp_dim=256,
        dropout_rate=0.0,
    )  # fmt: skip
    config = train.default_config()
    config.batch, config.accum_steps = 16, 1
    config.optimizer, config.momentum_dtype = "sgd", "float32"
    tx = train.make_optimizer(config)
    init = lambda: model.init(jax.random.key(0), jnp.zeros((1, 112, 112, 3)), train=False)
    state = jax.eval_shape(lambda: train.initial_state(init()["params"], tx))
    batch = {
        "image": jax.ShapeDtypeStruct((16, 112, 112, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((16,), jnp.int32),
    }

    def temp_bytes() -> int:
        step = train.make_train_step(model, tx, config, parallel.data_mesh())  # traced anew
        return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

    ours = temp_bytes()
    monkeypatch.setattr(models, "gelu", nn.gelu)
    flax_gelu = temp_bytes()
    # 13 154 820 against 14 793 220 bytes on XLA:CPU with jax 0.10.2, 11 516 164 against
    # 13 154 564 with jax 0.8.1. (A plain jax.grad of the model shows it on 0.10.2 only.)
    assert ours < 0.95 * flax_gelu, (ours, flax_gelu)


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: models.get_model("testing", classifier="cls"), "unknown classifier='cls'"),
        (lambda: models.get_model("testing", num_heads=3), "hidden_size=10 is not divisible by"),
        (lambda: models.get_model("ViT-Q_16"), "unknown model 'ViT-Q_16'; known models: testing"),
        (lambda: models.get_model("testing", heads=2), "unknown model option(s) ['heads']"),
        (
            lambda: models.get_model("testing", num_classes=-3),
            "num_classes=-3 must be a positive integer (None or 0: no head)",
        ),
        (lambda: models.get_model("testing", num_classes=2.5), "num_classes=2.5 must be a"),
        (lambda: models.get_model("testing", num_layers=0), "num_layers=0 must be a positive"),
        (lambda: models.get_model("testing", patch_size=(16, 0)), "patch_size=(16, 0) must be"),
        (lambda: models.get_model("testing", mlp_dim=True), "mlp_dim=True must be a positive"),
        (
            lambda: models.get_model("testing", representation_size=0),
            "representation_size=0 must be a positive integer (None: no pre-logits layer)",
        ),
        (lambda: models.get_model("testing", dropout_rate=1.0), "dropout_rate=1.0 must be a"),
        (
            lambda: models.get_model("testing", dropout_rate="0.1"),
            "dropout_rate='0.1' must be a number in [0, 1)",
        ),
        (
            lambda: models.get_model("testing", attention_dropout_rate=-0.1),
            "attention_dropout_rate=-0.1 must be a number in [0, 1)",
        ),
        (
            lambda: models.get_model("testing", dtype=jnp.int32),
            "the compute dtype is a floating type, e.g. jnp.float32 or jnp.bfloat16",
        ),
        (lambda: models.get_model("testing", dtype="bf16"), "dtype='bf16': the compute dtype"),
    ],
)
def test_bad_configuration_errors(build, message):
    with pytest.raises(ValueError) as e:
        build()
    assert message in str(e.value)


def test_sizes_and_dtypes_that_are_accepted():
    # NumPy integers (e.g. a dataset's class count), 0 classes (no head) and dtype names pass.
    for model in (
        models.get_model("testing", num_classes=np.int64(3), hidden_size=np.int32(10)),
        models.get_model("testing", num_classes=0, dtype="bfloat16"),
        models.get_model("testing", num_classes=None, dtype=np.float16, dropout_rate=0.0),
    ):
        out = jax.eval_shape(
            lambda m=model: m.init_with_output(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))[0]
        )
        width = 3 if model.num_classes else 10
        assert out.shape == (1, width) and out.dtype == jnp.float32


def test_image_size_must_be_positive():
    assert models.image_hw(32) == (32, 32) and models.image_hw([48, 64]) == (48, 64)
    with pytest.raises(ValueError, match=r"image size 0x32: height and width must be positive"):
        models.get_model("testing", num_classes=2).grid_size((0, 32))


def test_image_not_divisible_by_patch_size():
    model = models.get_model("testing", num_classes=2)
    with pytest.raises(
        ValueError, match="image size 30x32 is not divisible by the patch size 16x16"
    ):
        model.init(jax.random.key(0), jnp.zeros((1, 30, 32, 3)))


def test_summary_table():
    text = summary.summary(models.get_model("ViT-B_16", num_classes=1000), 224)
    assert "total                            86,567,656" in text
    gflops = float(text.rsplit(":", 1)[1])
    # 2 * 17.56 GMACs of matmuls, plus softmax/LayerNorm/GELU element-wise work, with every block on
    # every token (35.3); the last block on the class token alone spares 7 % of it.
    assert 32.5 < gflops < 33.0
    every_token = models.get_model("ViT-B_16", num_classes=None, classifier="token_unpooled")
    assert 35.0 < summary.forward_gflops(every_token, 224) < 36.0
    lines = text.splitlines()
    assert lines[3].startswith("embedding") and lines[-4].startswith("head")
    remat = models.get_model("ViT-B_16", num_classes=1000, remat=True)
    assert summary.forward_gflops(remat, 224) == pytest.approx(gflops, rel=1e-3)


def test_flops_count_attention_whichever_kernel_runs_it(monkeypatch):
    # XLA counts no FLOPs for cuDNN's attention (a custom call), so the count is always taken on the
    # einsum form: ViT-B/16 at 384 px lowered for CUDA counted 99.1 instead of 111.6 GFLOPs.
    model = models.get_model("ViT-Ti_16", num_classes=10, dtype=jnp.bfloat16)
    einsum = summary.forward_gflops(model, 224)
    assert model.attention_path() == "einsum" and 2.3 < einsum < 2.4  # this CPU's own kernel
    monkeypatch.setattr(models, "use_fused_attention", lambda: True)
    monkeypatch.setattr(models, "fused_attention_implementation", lambda *a: "cudnn")  # a GPU's
    for attention, path in (("auto", "cudnn"), ("cudnn", "cudnn"), ("xla", "xla")):
        assert model.clone(attention=attention).attention_path() == path
        assert summary.forward_gflops(model.clone(attention=attention), 224) == einsum


def test_flops_count_without_a_lowered_cost_analysis(monkeypatch):
    # On a GPU (jax 0.11.2, CUDA plugin) `Lowered.cost_analysis` returned None and the benchmark
    # failed; the count is lowered for the CPU, and without a CPU backend taken after compiling.
    model = models.get_model("ViT-Ti_16", num_classes=10)
    lowered = summary.forward_gflops(model, 224)
    assert 2.3 < lowered < 2.4
    real_local_devices = jax.local_devices

    def no_cpu(*args, backend=None, **kwargs):
        if backend == "cpu":
            raise RuntimeError("Unknown backend cpu. Available backends are ['cuda']")
        return real_local_devices(*args, backend=backend, **kwargs)

    monkeypatch.setattr(jax, "local_devices", no_cpu)
    monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", lambda self: None)
    assert summary.forward_gflops(model, 224) == pytest.approx(lowered, rel=0.02)


def test_importing_the_package_does_not_import_tensorflow():
    code = "import sys, vit_jax, vit_jax.models; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _compiled_dot_operands(text: str) -> list[tuple[str, ...]]:
    """(result, lhs, rhs) shapes of every dot in an optimized HLO module's text; XLA's instruction
    names are unique in a module, so operands are looked up by name."""
    shapes = dict(re.findall(r"^\s*(?:ROOT )?(%\S+) = (\w+\[[\d,]*\])", text, re.M))
    dots = re.findall(r"= (\w+\[[\d,]*\])\S* dot\((%[^,\s]+), (%[^,)\s]+)\)", text)
    return [(out, shapes[lhs], shapes[rhs]) for out, lhs, rhs in dots]


@pytest.mark.parametrize("train", [False, True])
def test_bfloat16_attention_products_run_on_bfloat16_operands_on_xla_cpu(train):
    # Over (N, heads) batch axes, XLA:CPU converted the heads-major bfloat16 operands to float32,
    # and the products ran at the float32 rate (ViT-B/16's attention 1.6x slower on AMX): over one
    # N*heads axis both forward products keep bfloat16 operands, and backward all four do, the two
    # that contract both operands' first axes (dK, dV) through a unit contracting axis.
    model = models.get_model(
        "testing", num_classes=5, num_layers=2, hidden_size=64, num_heads=4, mlp_dim=128,
        dropout_rate=0.0, dtype=jnp.bfloat16,
    )  # fmt: skip
    # 2 images of 17 tokens, 4 heads: products over a batch axis of 8 in the first block (the last
    # one computes the class token alone, products of one query that XLA rewrites).
    images, params = _init(model, (2, 64, 64, 3))
    if train:
        loss = lambda p: jnp.sum(model.apply({"params": p}, images, train=True) ** 2)
        fn = jax.jit(jax.grad(loss))
    else:
        fn = jax.jit(lambda p: model.apply({"params": p}, images))
    dots = _compiled_dot_operands(fn.lower(params).compile().as_text())
    attention = collections.Counter(
        (lhs.split("[")[0], rhs.split("[")[0])
        for out, lhs, rhs in dots
        if out.startswith("f32[8,17,")
    )
    assert attention == {("bf16", "bf16"): 6 if train else 2}


def test_bfloat16_kernel_gradients_lay_out_the_smaller_operand_on_xla_cpu():
    # XLA:CPU lays a kernel gradient's first operand out as (in, tokens), and its bfloat16
    # transposes are slow: where the cotangent and the float32 result are smaller than the
    # activation, the gradient is the product (out, tokens)·(tokens, in), transposed after.
    model = models.get_model(
        "testing", num_classes=5, num_layers=2, hidden_size=32, num_heads=2, mlp_dim=128,
        dropout_rate=0.0, dtype=jnp.bfloat16,
    )  # fmt: skip
    # 8 images of 16 patches and a class token: 136 rows in the first block, 8 in the last one
    # (the class tokens alone), 128 for the patch embedding.
    images, params = _init(model, (8, 64, 64, 3))
    loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, images, train=True) ** 2)
    fn = jax.jit(jax.grad(loss(model)))
    dots = collections.Counter(_compiled_dot_operands(fn.lower(params).compile().as_text()))
    # The first block's MLP: (32, 128)·... for the input layer's kernel, and the output layer's
    # (128, 32) kernel the same way, transposed; never the (128, 136) activation laid out.
    assert dots[("f32[32,128]", "bf16[32,136]", "bf16[136,128]")] == 2
    assert not any(lhs == "bf16[128,136]" for _, lhs, _ in dots)
    # The patch embedding's (768, 32) kernel too; the last block's 8 rows keep the direct form.
    assert dots[("f32[32,768]", "bf16[32,128]", "bf16[128,768]")] == 1
    assert dots[("f32[128,32]", "bf16[128,8]", "bf16[8,32]")] == 1
    # The program runs on XLA:CPU (a bfloat16 product over both operands' first axes would not)
    # and its kernel gradients are the float32 model's to bfloat16 rounding (measured: 2.2, 2.1
    # and 2.9 %, the same as with every kernel gradient in the direct form).
    ours = fn(params)
    f32 = model.clone(dtype=jnp.float32)
    with jax.default_matmul_precision("highest"):
        ref = jax.grad(loss(f32))(params)
    mlp = lambda g: g["Transformer"]["encoderblock_0"]["MlpBlock_3"]
    for layer in ("Dense_0", "Dense_1"):
        assert _relative_error(mlp(ours)[layer]["kernel"], mlp(ref)[layer]["kernel"]) < 0.05
    assert _relative_error(ours["embedding"]["kernel"], ref["embedding"]["kernel"]) < 0.05


def test_bfloat16_attention_gradients_lay_out_the_smaller_operand_on_xla_cpu():
    # dK and dV contract both operands' first axes after the batch axis, and XLA:CPU lays out the
    # one holding the result's first axis: the (L, L) cotangent or weights. With more tokens than
    # twice the head width, dK^T and dV^T are computed instead (the (head_dim, L) operand laid out)
    # and transposed after.
    model = models.get_model(
        "testing", num_classes=5, num_layers=2, hidden_size=32, num_heads=4, mlp_dim=64,
        dropout_rate=0.0, dtype=jnp.bfloat16,
    )  # fmt: skip
    images, params = _init(model, (8, 64, 64, 3))  # 17 tokens, head width 8, 8 * 4 heads
    loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, images, train=True) ** 2)
    fn = jax.jit(jax.grad(loss(model)))
    text = fn.lower(params).compile().as_text()
    dots = collections.Counter(_compiled_dot_operands(text))
    assert dots[("f32[32,8,17]", "bf16[32,8,17]", "bf16[32,17,17]")] == 2  # the first block's
    assert not re.search(r"= bf16\[32,17,17\]\S* transpose\(", text)
    ours = fn(params)
    f32 = model.clone(dtype=jnp.float32)
    with jax.default_matmul_precision("highest"):
        ref = jax.grad(loss(f32))(params)
    attention = lambda g: g["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]
    for layer in ("query", "key", "value"):
        assert (
            _relative_error(attention(ours)[layer]["kernel"], attention(ref)[layer]["kernel"])
            < 0.05
        )


@pytest.mark.parametrize("cpu", [True, False])
def test_bfloat16_backward_product_forms_are_for_xla_cpu(cpu, monkeypatch):
    # The transposed kernel gradient and the unit contracting axis of dK and dV work around
    # XLA:CPU; elsewhere (the einsum attention runs on GPUs and TPUs too) the backward products are
    # the direct einsums.
    monkeypatch.setattr(models, "on_xla_cpu", lambda: cpu)
    barriers = unit_axis = 0
    for dims, lhs_shape, rhs_shape in DOT_PRODUCTS:
        lhs, rhs = jnp.ones(lhs_shape, jnp.bfloat16), jnp.ones(rhs_shape, jnp.bfloat16)
        product = functools.partial(models.mixed_dot_general, dimension_numbers=dims)
        out, vjp = jax.vjp(product, lhs, rhs)
        for eqn in jax.make_jaxpr(vjp)(out).jaxpr.eqns:
            barriers += eqn.primitive.name == "optimization_barrier"
            shapes = [v.aval.shape for v in eqn.invars]
            unit_axis += eqn.primitive.name == "dot_general" and shapes[0][0] == 1
    # On XLA:CPU: the Dense kernel gradient, and dK (q k^T) and dV (weights v) at 11 tokens,
    # computed transposed; dK and dV over a unit contracting axis.
    assert (barriers, unit_axis) == ((3, 4) if cpu else (0, 0))
