"""Checkpoints: published-layout npz files in, every layout, position-embedding resize, errors, save."""

import functools
import http.server
import os
import pickle
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from vit_jax import checkpoint, models


def _random_params(model, image_size, seed=0):
    """Initialised params with every leaf randomised (the head too), as numpy."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    params = model.init(jax.random.key(seed), jnp.zeros((1, h, w, 3)))["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [
        np.asarray(x + 0.1 * jax.random.normal(k, x.shape))
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves)


def _write_published(params, path, transform=lambda flat: flat, **savez_kw):
    """Our own writer of the published layout: flat '/'-joined names, one array each."""
    flat = {
        "/".join(k.key for k in key_path): np.asarray(v)
        for key_path, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    np.savez(path, **transform(flat), **savez_kw)
    return path


def _images(shape=(2, 32, 32, 3)):
    return jax.random.uniform(jax.random.key(7), shape, minval=-1, maxval=1)


def _logits(model, params, images):
    return np.asarray(model.apply({"params": params}, images))


TINY = dict(num_classes=5, num_layers=2, hidden_size=16, num_heads=2, mlp_dim=24, dropout_rate=0.0)


def test_published_layout_round_trip_gives_same_logits(tmp_path):
    model = models.get_model("testing", representation_size=8, **TINY)
    params = _random_params(model, 32)
    path = _write_published(params, tmp_path / "tiny.npz")
    restored = checkpoint.load(str(path))
    images = _images()
    np.testing.assert_array_equal(_logits(model, restored, images), _logits(model, params, images))


@pytest.mark.parametrize(
    "name,transform",
    [
        ("params/ prefix", lambda f: {f"params/{k}": v for k, v in f.items()}),
        (
            "opt/target/ prefix with optimizer state",
            lambda f: {
                **{f"opt/target/{k}": v for k, v in f.items()},
                **{f"opt/state/param_states/{k}/momentum": v for k, v in f.items()},
            },
        ),
        (
            "Linen block names",
            lambda f: {
                k.replace("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
                .replace("LayerNorm_2", "LayerNorm_1")
                .replace("MlpBlock_3", "MlpBlock_0"): v
                for k, v in f.items()
            },
        ),
    ],
)
def test_prefixed_and_linen_layouts(tmp_path, name, transform):
    model = models.get_model("testing", **TINY)
    params = _random_params(model, 32)
    path = _write_published(params, tmp_path / "x.npz", transform)
    restored = checkpoint.load(str(path))
    images = _images()
    np.testing.assert_array_equal(_logits(model, restored, images), _logits(model, params, images))


def _to_big_vision(flat, depth):
    """big_vision: scanned blocks with Linen names, top-level pos_embedding without the cls entry."""
    out = {}
    rename = {
        "LayerNorm_0": "LayerNorm_0",
        "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
        "LayerNorm_2": "LayerNorm_1",
        "MlpBlock_3": "MlpBlock_0",
    }
    for k, v in flat.items():
        if k.startswith("Transformer/encoderblock_0/"):
            rest = k.split("/", 2)[2]
            module, _, leaf = rest.partition("/")
            stacked = np.stack(
                [flat[k.replace("encoderblock_0", f"encoderblock_{i}")] for i in range(depth)]
            )
            out[f"params/Transformer/encoderblock/{rename[module]}/{leaf}"] = stacked
        elif k == "Transformer/posembed_input/pos_embedding":
            out["params/pos_embedding"] = v[:, 1:]
        elif not k.startswith("Transformer/encoderblock_"):
            out[f"params/{k}"] = v
    return out


def test_big_vision_layout(tmp_path):
    model = models.get_model("testing", **TINY)
    params = _random_params(model, 32)
    # big_vision adds no position embedding to the class token: make ours zero there to compare.
    pe = params["Transformer"]["posembed_input"]["pos_embedding"]
    params["Transformer"]["posembed_input"]["pos_embedding"] = np.concatenate(
        [np.zeros_like(pe[:, :1]), pe[:, 1:]], axis=1
    )
    path = _write_published(params, tmp_path / "bv.npz", lambda f: _to_big_vision(f, 2))
    _, layout = checkpoint.normalize(dict(np.load(path)))
    assert layout.startswith("big_vision") and "scanned blocks" in layout
    restored = checkpoint.load(str(path))
    images = _images()
    np.testing.assert_array_equal(_logits(model, restored, images), _logits(model, params, images))


def test_hybrid_groupnorm_stored_as_1x1x1xC(tmp_path):
    model = models.get_model("R+ViT-Ti_16", num_classes=3, num_layers=1)
    params = _random_params(model, 64)

    def as_4d(flat):
        return {
            k: (v.reshape(1, 1, 1, -1) if "/gn_root/" in f"/{k}" else v) for k, v in flat.items()
        }

    path = _write_published(params, tmp_path / "hybrid.npz", as_4d)
    assert np.load(path)["gn_root/scale"].shape == (1, 1, 1, 64)
    restored = checkpoint.load(str(path))
    assert restored["gn_root"]["scale"].shape == (64,)
    images = _images((1, 64, 64, 3))
    np.testing.assert_array_equal(_logits(model, restored, images), _logits(model, params, images))


def _corner_aligned_bilinear(grid, gh, gw):
    """Independent reference: output i samples input i * (n_in - 1) / (n_out - 1)."""

    def axis_weights(n_in, n_out):
        pos = np.arange(n_out) * (n_in - 1) / max(n_out - 1, 1)
        lo = np.clip(np.floor(pos).astype(int), 0, n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, pos - lo

    y0, y1, wy = axis_weights(grid.shape[0], gh)
    x0, x1, wx = axis_weights(grid.shape[1], gw)
    wy, wx = wy[:, None, None], wx[None, :, None]
    top = grid[y0][:, x0] * (1 - wx) + grid[y0][:, x1] * wx
    bottom = grid[y1][:, x0] * (1 - wx) + grid[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


@pytest.mark.parametrize("old,new", [(14, (24, 24)), (24, (14, 14)), (7, (12, 12)), (14, (24, 32))])
@pytest.mark.parametrize("has_class_token", [True, False])
def test_posemb_resize_is_corner_aligned_bilinear(old, new, has_class_token):
    rng = np.random.default_rng(0)
    ntok = 1 if has_class_token else 0
    posemb = rng.normal(size=(1, ntok + old * old, 8)).astype(np.float32)
    out = checkpoint.resize_posemb(posemb, new, has_class_token)
    assert out.shape == (1, ntok + new[0] * new[1], 8) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :ntok], posemb[:, :ntok])
    grid = posemb[0, ntok:].reshape(old, old, 8)
    got = out[0, ntok:].reshape(*new, 8)
    np.testing.assert_allclose(got, _corner_aligned_bilinear(grid, *new), rtol=1e-5, atol=1e-5)
    zoom = scipy.ndimage.zoom(grid, (new[0] / old, new[1] / old, 1), order=1)
    np.testing.assert_allclose(got, zoom, rtol=1e-6, atol=1e-6)
    # Corners are kept exactly (corner alignment), unlike jax.image.resize's half-pixel centres.
    np.testing.assert_allclose(
        got[[0, 0, -1, -1], [0, -1, 0, -1]], grid[[0, 0, -1, -1], [0, -1, 0, -1]], rtol=1e-6
    )
    if old != new[0]:
        jax_resized = np.asarray(jax.image.resize(grid, (*new, 8), "bilinear"))
        assert not np.allclose(got, jax_resized, atol=1e-3)


def test_interpolate_posembed_reference_signature():
    posemb = np.random.default_rng(1).normal(size=(1, 1 + 14 * 14, 4)).astype(np.float32)
    out = checkpoint.interpolate_posembed(posemb, 1 + 24 * 24, has_class_token=True)
    np.testing.assert_array_equal(out, checkpoint.resize_posemb(posemb, (24, 24), True))
    with pytest.raises(checkpoint.CheckpointError, match="square grid"):
        checkpoint.interpolate_posembed(posemb, 1 + 24 * 32 + 1, has_class_token=True)


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_load_pretrained_for_fine_tuning_at_new_resolution(tmp_path, classifier):
    pretrained = models.get_model(
        "testing", representation_size=8, classifier=classifier, **{**TINY, "num_classes": 21}
    )
    params = _random_params(pretrained, 32)  # 2x2 grid
    path = _write_published(params, tmp_path / "i21k.npz")

    # Fine-tune at 48x64 (3x4 grid), 3 classes, without pre_logits (representation_size=None).
    model = models.get_model("testing", classifier=classifier, **{**TINY, "num_classes": 3})
    init = model.init(jax.random.key(3), jnp.zeros((1, 48, 64, 3)))["params"]
    out = checkpoint.load_pretrained(
        pretrained_path=str(path), init_params=init, model_config=model, grid_size=(3, 4)
    )
    assert jax.tree.map(np.shape, out) == jax.tree.map(np.shape, init)
    assert "pre_logits" not in out
    np.testing.assert_array_equal(out["head"]["kernel"], np.zeros((16, 3)))
    ntok = 1 if classifier == "token" else 0
    posemb = out["Transformer"]["posembed_input"]["pos_embedding"]
    old = params["Transformer"]["posembed_input"]["pos_embedding"]
    np.testing.assert_array_equal(posemb[:, :ntok], old[:, :ntok])
    np.testing.assert_allclose(
        posemb[0, ntok:].reshape(3, 4, 16),
        _corner_aligned_bilinear(old[0, ntok:].reshape(2, 2, 16), 3, 4),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_array_equal(
        out["Transformer"]["encoderblock_1"]["MlpBlock_3"]["Dense_0"]["kernel"],
        params["Transformer"]["encoderblock_1"]["MlpBlock_3"]["Dense_0"]["kernel"],
    )
    # With representation_size set, pre_logits is kept; a reference-style dict config works too.
    keep = models.get_model("testing", representation_size=8, classifier=classifier, **TINY)
    init = keep.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))["params"]
    out = checkpoint.load_pretrained(
        pretrained_path=str(path),
        init_params=init,
        model_config={"classifier": classifier, "representation_size": 8},
    )
    np.testing.assert_array_equal(out["pre_logits"]["kernel"], params["pre_logits"]["kernel"])


def test_wrong_model_says_what_the_file_holds_and_lists_differences(tmp_path):
    params = _random_params(models.get_model("testing", **TINY), 32)
    path = _write_published(params, tmp_path / "tiny.npz")
    other = models.get_model("testing", **{**TINY, "num_layers": 3, "mlp_dim": 32})
    init = other.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_pretrained(pretrained_path=str(path), init_params=init, model_config=other)
    lines = str(e.value).splitlines()
    assert lines[0] == (
        f"{path} does not fit the model. It holds a model not in the variant table (patch_size="
        "(16, 16), hidden_size=16, num_layers=2, num_heads=2, mlp_dim=24, resnet_layers=None, "
        "classifier=token). 22 differences (! shape, + missing, - unexpected):"
    )
    # Shapes first, then what is missing; at most 12 lines, then a count.
    assert lines[1:3] == [
        "  ! Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel: checkpoint (16, 24), model (16, 32)",
        "  ! Transformer/encoderblock_0/MlpBlock_3/Dense_0/bias: checkpoint (24,), model (32,)",
    ]
    assert lines[7].startswith("  + Transformer/encoderblock_2/") and len(lines) == 14
    assert lines[-1] == "  ... and 10 more"
    with_extra = _write_published({**params, "extra": {"kernel": np.ones(3)}}, tmp_path / "e.npz")
    model = models.get_model("testing", **TINY)
    init = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    with pytest.raises(
        checkpoint.CheckpointError, match=r"- extra/kernel \(3,\) \(not in the model\)"
    ):
        checkpoint.load_pretrained(
            pretrained_path=str(with_extra), init_params=init, model_config=model
        )


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    np.savez(path, **{"embedding/kernel": np.array([_Exploit(str(marker))], dtype=object)})
    with pytest.raises(checkpoint.CheckpointError, match="pickled Python objects; refusing"):
        checkpoint.load(str(path))
    assert not marker.exists()


def test_a_file_that_is_not_a_zip_archive_is_refused_unread(tmp_path):
    # np.load would take a raw pickle for one and answer with advice to unpickle it.
    marker = tmp_path / "pwned"
    path = tmp_path / "ViT-B_16.npz"
    path.write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(str(path))
    assert "is not an .npz checkpoint: it is not a zip archive" in str(e.value)
    assert "allow_pickle" not in str(e.value) and not marker.exists()


def test_truncated_file(tmp_path):
    params = _random_params(models.get_model("testing", **TINY), 32)
    path = _write_published(params, tmp_path / "t.npz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load(str(path))


def test_nan_or_integer_weights_are_refused_where_they_would_be_used(tmp_path, capsys):
    model = models.get_model("testing", **TINY)
    params = _random_params(model, 32)
    block = "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"

    def spoil(flat):
        flat[block] = flat[block].copy()
        flat[block][0, :3] = [np.nan, np.inf, -np.inf]
        flat["head/kernel"] = np.full_like(flat["head/kernel"], np.nan)
        return flat

    path = _write_published(params, tmp_path / "nan.npz", spoil)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_pretrained_model(None, str(path), num_classes=5)
    assert str(e.value) == (
        f"{path} cannot be used: {block} holds 3 NaN or infinite values; use another checkpoint "
        "(NaN or infinite weights: a damaged file, or a run that diverged)"
    )  # (the head, which a new head of 5 classes replaces, does not count)
    with pytest.raises(checkpoint.CheckpointError, match=f"{block} holds 3 NaN"):
        checkpoint.load_pretrained(
            pretrained_path=str(path), init_params=params, model_config=model
        )
    assert np.isnan(checkpoint.load(str(path))["head"]["kernel"]).all()  # read as it is
    checkpoint.main(["inspect", str(path)])
    report = capsys.readouterr().out.splitlines()
    assert report[-2:] == [
        f"unusable: {block} holds 3 NaN or infinite values",
        "unusable: head/kernel holds 80 NaN or infinite values",
    ]

    ints = _write_published(
        params, tmp_path / "int.npz", lambda flat: {k: v.astype(np.int32) for k, v in flat.items()}
    )
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_pretrained_model(None, str(ints))
    message = str(e.value)
    assert message.startswith(f"{ints} cannot be used: ") and "NaN" not in message
    assert message.count("holds int32 values, not floating-point weights; ") == 2
    assert message.endswith(", and 37 more arrays; use another checkpoint")  # 40 arrays
    # float16 and bfloat16 weights are weights: float32 once loaded.
    half = _write_published(
        params,
        tmp_path / "half.npz",
        lambda flat: {k: v.astype(np.float16) for k, v in flat.items()},
    )
    _, loaded = checkpoint.load_pretrained_model(None, str(half))
    assert {leaf.dtype for leaf in jax.tree.leaves(loaded)} == {np.dtype(np.float32)}
    assert checkpoint.unusable_values({"w": jnp.ones(3, jnp.bfloat16)}) == []


def test_missing_file_says_where_the_published_files_are(tmp_path):
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(str(tmp_path / "ViT-B_16.npz"))
    assert "not found" in str(e.value)
    assert "gs://vit_models/imagenet21k/ViT-B_16.npz" in str(e.value)
    assert "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz" in str(e.value)


def test_unknown_layout_is_reported(tmp_path):
    path = tmp_path / "resnet.npz"
    np.savez(path, **{"conv1/kernel": np.zeros((3, 3, 3, 8)), "fc/bias": np.zeros(10)})
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(str(path))
    assert "unrecognised checkpoint layout" in str(e.value)
    assert str(e.value).endswith(
        "the file holds 2 arrays:\n  conv1/kernel (3, 3, 3, 8)\n  fc/bias (10,)"
    )

    np.savez(path)
    with pytest.raises(checkpoint.CheckpointError, match=r"; the file holds no arrays$"):
        checkpoint.load(str(path))
    np.savez(path, **{f"w{i:02d}": np.zeros(i) for i in range(30)})
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(str(path))
    assert "the file holds 30 arrays, the first 25:\n  w00 (0,)" in str(e.value)
    assert "w24 (24,)" in str(e.value) and "w25" not in str(e.value)


def test_save_writes_the_published_layout_and_round_trips(tmp_path):
    model = models.get_model("testing", representation_size=8, **TINY)
    params = jax.tree.map(jnp.asarray, _random_params(model, 32))
    old_umask = os.umask(0o022)
    try:
        path = checkpoint.save(params, str(tmp_path / "out" / "model.npz"))
    finally:
        os.umask(old_umask)
    assert os.listdir(tmp_path / "out") == ["model.npz"]
    # The usual permissions, not tempfile's owner-only 0600 (an exported model is shared).
    assert os.stat(path).st_mode & 0o777 == 0o644
    with np.load(
        path, allow_pickle=False
    ) as npz:  # what any other reader of the published files sees
        names = set(npz.files)
        assert all(npz[k].dtype == np.float32 for k in names)
    assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/out/kernel" in names
    assert "Transformer/posembed_input/pos_embedding" in names and "pre_logits/kernel" in names
    expected = {
        "/".join(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    assert names == expected
    loaded = checkpoint.load(path)
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))


def test_load_pretrained_model_for_inference(tmp_path):
    model = models.get_model("testing", num_classes=5)
    params = _random_params(model, 32)
    path = _write_published(params, tmp_path / "testing.npz")
    images = _images()
    loaded_model, loaded = checkpoint.load_pretrained_model(None, str(path))
    assert loaded_model.num_classes == 5 and loaded_model.num_layers == 1
    np.testing.assert_array_equal(
        _logits(loaded_model, loaded, images), _logits(model, params, images)
    )
    # New resolution and a new (zero) head.
    m2, p2 = checkpoint.load_pretrained_model("testing", str(path), num_classes=3, image_size=64)
    assert p2["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 17, 10)
    assert _logits(m2, p2, _images((1, 64, 64, 3))).shape == (1, 3)
    with pytest.raises(checkpoint.CheckpointError, match="does not hold a ViT-B_16 model"):
        checkpoint.load_pretrained_model("ViT-B_16", str(path))


def test_http_download_progress_and_cache(tmp_path, monkeypatch):
    model = models.get_model("testing", num_classes=5)
    params = _random_params(model, 32)
    served = tmp_path / "served"
    served.mkdir()
    _write_published(params, served / "ViT-testing.npz")
    monkeypatch.setenv("VIT_JAX_CACHE", str(tmp_path / "cache"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/ViT-testing.npz"
    try:
        first = checkpoint.load(url)
    finally:
        server.shutdown()
        server.server_close()
    cached = os.listdir(tmp_path / "cache")
    assert len(cached) == 1 and cached[0].endswith("-ViT-testing.npz")
    second = checkpoint.load(url)  # the server is gone: served from the cache
    jax.tree.map(np.testing.assert_array_equal, first, second)
    jax.tree.map(np.testing.assert_array_equal, first, params)


class _CutShort(http.server.BaseHTTPRequestHandler):
    """Promises 1000 bytes of /half.npz and sends 12; answers 404 for anything else."""

    def do_GET(self):
        if self.path != "/half.npz":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"PK\x03\x04 partial")
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_failed_downloads_are_one_error_and_leave_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_JAX_CACHE", str(tmp_path / "cache"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(checkpoint.CheckpointError) as cut:
            checkpoint.load(f"{base}/half.npz")
        with pytest.raises(checkpoint.CheckpointError) as missing:
            checkpoint.load(f"{base}/ViT-B_16.npz")
    finally:
        server.shutdown()
        server.server_close()
    assert str(cut.value).startswith(f"could not download {base}/half.npz (")
    assert "closed after 12 of 1000 bytes" in str(cut.value) or "IncompleteRead" in str(cut.value)
    assert "(HTTPError: HTTP Error 404: Not Found)" in str(missing.value)
    assert os.listdir(tmp_path / "cache") == []  # no partial file, no cached half

    import tensorflow as tf

    def unreachable(path):
        raise tf.errors.FailedPreconditionError(None, None, "Could not resolve host: googleapis")

    monkeypatch.setattr(tf.io.gfile, "exists", unreachable)
    with pytest.raises(checkpoint.CheckpointError) as gs:
        checkpoint.load("gs://vit_models/imagenet21k/ViT-B_16.npz")
    assert "(FailedPreconditionError: Could not resolve host: googleapis)" in str(gs.value)


def test_cli_inspect_and_convert(tmp_path, capsys):
    model = models.get_model("testing", num_classes=5)
    params = _random_params(model, 32)
    bv = _write_published(params, tmp_path / "bv.npz", lambda f: _to_big_vision(f, 1))
    checkpoint.main(["inspect", str(bv)])
    out = capsys.readouterr().out
    assert "layout: big_vision (prefix 'params/', scanned blocks, Linen block names" in out
    # embedding 7,690 + cls 10 + posemb 5x10 (cls row restored) + block 700 + norm 20 + head 55
    assert "8,525 parameters" in out
    assert "matches: testing, testing-unpooled" in out
    assert "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" in out
    dst = tmp_path / "published.npz"
    checkpoint.main(["convert", str(bv), str(dst)])
    assert (
        "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
        in np.load(dst).files
    )
    with pytest.raises(SystemExit) as e:
        checkpoint.main(["inspect", str(tmp_path / "nope.npz")])
    assert e.value.code == 2
    assert "gs://vit_models" in capsys.readouterr().err
    # An existing file is not replaced without --overwrite, the source itself included.
    before = bv.read_bytes()
    for target in (dst, bv):
        with pytest.raises(SystemExit) as e:
            checkpoint.main(["convert", str(bv), str(target)])
        assert e.value.code == 2
        assert f"error: {target} exists; choose another name, or pass --overwrite" in (
            capsys.readouterr().err
        )
    assert bv.read_bytes() == before
    checkpoint.main(["convert", str(bv), str(bv), "--overwrite"])
    assert "layout: published" in checkpoint.inspect(str(bv))
