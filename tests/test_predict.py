"""Predictions: top-k labels from a checkpoint whose head is built to prefer a known class."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vit_jax import checkpoint, models, predict


def _checkpoint(path, num_classes=3, preferred=2, **overrides):
    """A model whose head ignores the features (zero kernel) and whose bias favours `preferred`."""
    model = models.get_model("testing", num_classes=num_classes, **overrides)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    params["head"]["bias"] = jnp.zeros(num_classes).at[preferred].set(5.0)
    checkpoint.save(params, str(path))
    return path


def _images(directory, n=3, corrupt=True):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        size = (20 + 7 * i, 40 - 5 * i)
        mode = ("RGB", "L", "RGBA")[i % 3]
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).convert(mode).save(
            directory / f"img{i}.png"
        )
    if corrupt:
        (directory / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return directory


def test_json_top1_is_the_preferred_class_and_bad_files_are_reported(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m.npz")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    images = _images(tmp_path / "images", n=5)
    with pytest.raises(SystemExit) as e:  # every readable image is printed, then status 1
        predict.main([str(images), "--checkpoint", str(ckpt), "--labels", str(labels),
                      "--top_k", "2", "--batch", "2", "--json"])  # fmt: skip
    assert e.value.code == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert [r["file"].rsplit("/", 1)[1] for r in out["results"]] == [
        f"img{i}.png" for i in range(5)
    ]
    expected = math.exp(5) / (math.exp(5) + 2)
    for r in out["results"]:
        assert [p["label"] for p in r["predictions"]] == ["bird", "cat"]
        assert r["predictions"][0]["probability"] == pytest.approx(expected, rel=1e-5)
    assert [e["file"].rsplit("/", 1)[1] for e in out["errors"]] == ["broken.jpg"]
    assert "could not read" in captured.err and "broken.jpg" in captured.err


def test_folders_without_images(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m.npz")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    # Nothing to predict: a usage error, before the checkpoint is even looked at.
    with pytest.raises(SystemExit) as e:
        predict.main([str(empty), "--checkpoint", str(tmp_path / "missing.npz")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no image files (.jpg .jpeg .png") and str(empty) in err
    assert err.count("\n") == 1
    # An empty folder beside images: the images are predicted, the folder reported, status 1.
    images = _images(tmp_path / "images", n=2, corrupt=False)
    with pytest.raises(SystemExit) as e:
        predict.main([str(empty), str(images), "--checkpoint", str(ckpt), "--json"])
    assert e.value.code == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert len(out["results"]) == 2
    assert [x["file"] for x in out["errors"]] == [str(empty)]
    assert f"could not read {empty}: no image files" in captured.err


def test_text_output_and_image_size(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m.npz", num_classes=4, preferred=1)
    images = _images(tmp_path / "images", n=1, corrupt=False)
    predict.main(
        [str(images / "img0.png"), "--checkpoint", str(ckpt), "--image_size", "64", "--top_k", "1"]
    )
    line = capsys.readouterr().out.strip()
    assert line.endswith("img0.png: 1 " + f"{math.exp(5) / (math.exp(5) + 3):.3f}")


def test_workdir_with_custom_architecture_and_class_names(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    # Sizes that match no named variant, like the digits demo's model.
    _checkpoint(
        run / "model.npz", num_classes=2, preferred=0, hidden_size=12, mlp_dim=20, patch_size=(8, 8)
    )
    (run / "eval.json").write_text(json.dumps({"class_names": ["blue", "red"]}))
    images = _images(tmp_path / "images", n=2, corrupt=False)
    predict.main([str(images), "--workdir", str(run), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert [r["predictions"][0]["label"] for r in out["results"]] == ["blue", "blue"]


def test_16_bit_png_reads_as_training_reads_it(tmp_path):
    import tensorflow as tf

    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    path = tmp_path / "scan.png"
    Image.fromarray(ramp).save(path)  # 16-bit greyscale; PIL's RGB conversion would clip it
    ours = predict.load_image(str(path), (16, 16))
    decoded = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
    training = decoded.numpy().astype(np.float32) / 127.5 - 1.0  # input_pipeline's normalisation
    assert ours.shape == (16, 16, 3) and ours.min() == -1.0 and ours.max() == 1.0
    np.testing.assert_allclose(ours, training, atol=1.01 / 127.5)


@pytest.mark.parametrize("shape, size", [((40, 30), (16, 16)), ((20, 20), (48, 48))])
def test_prediction_input_equals_evaluation_input(tmp_path, shape, size):
    # Predictions see what evaluation saw: the same resize (bilinear, antialiased) and scaling, to
    # within PIL's rounding to 8 bits (one grey level).
    import tensorflow as tf

    from vit_jax import input_pipeline, train

    pixels = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(pixels).save(path)
    config = train.default_config()
    config.image_size = size[0]
    evaluated = input_pipeline.preprocess_eval(tf.io.read_file(str(path)), config, encoded=True)
    np.testing.assert_allclose(
        predict.load_image(str(path), size), evaluated.numpy(), atol=1.001 / 127.5
    )


def test_images_beyond_pils_size_limit_are_decoded_as_evaluation_decodes_them(
    tmp_path, monkeypatch
):
    # PIL refuses an image over twice Image.MAX_IMAGE_PIXELS as a possible decompression bomb;
    # evaluation and training decode it with TensorFlow, and so does predict then.
    import tensorflow as tf

    from vit_jax import input_pipeline, train

    pixels = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    path = tmp_path / "big.png"
    Image.fromarray(pixels).save(path)
    by_pil = predict.load_image(str(path), (16, 16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # refused from 1000 pixels on: 1200 here
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    loaded = predict.load_image(str(path), (16, 16))
    config = train.default_config()
    config.image_size = 16
    evaluated = input_pipeline.preprocess_eval(tf.io.read_file(str(path)), config, encoded=True)
    np.testing.assert_array_equal(loaded, evaluated.numpy())
    np.testing.assert_allclose(loaded, by_pil, atol=1.001 / 127.5)  # PIL's 8-bit rounding


def test_directories_are_walked_without_hidden_entries(tmp_path):
    for rel in (
        "b.png",
        "sub/a.JPG",
        ".ipynb_checkpoints/b-checkpoint.png",
        "sub/._a.JPG",
        "c.txt",
        "run/config.json",
        "run/labels.txt",
        "run/curves.png",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    # A run directory's images are read when asked for (image-folder datasets leave them out).
    assert predict.find_images([str(tmp_path), "given.png"]) == [
        str(tmp_path / "b.png"),
        str(tmp_path / "run" / "curves.png"),
        str(tmp_path / "sub" / "a.JPG"),
        "given.png",
    ]


def test_imagenet_labels_ship_with_the_package():
    names = predict.imagenet_labels()
    assert len(names) == 1000
    assert (names[0], names[207], names[281], names[999]) == (
        "tench",
        "golden retriever",
        "tabby",
        "toilet tissue",
    )


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--top_k", "0", "argument --top_k: 0 must be at least 1"),
        ("--batch", "0", "argument --batch: 0 must be at least 1"),
        ("--image_size", "-32", "argument --image_size: -32 must be at least 1"),
        ("--image_size", "big", "argument --image_size: 'big' is not an integer"),
    ],
)
def test_bad_numbers_are_usage_errors(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as e:
        predict.main(
            [str(tmp_path / "cat.jpg"), "--checkpoint", str(tmp_path / "m.npz"), option, value]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.rstrip().splitlines()[-1].endswith(f"error: {message}") and "Traceback" not in err


def test_run_directory_without_model_or_checkpoints_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        predict.main([str(tmp_path / "cat.jpg"), "--workdir", str(tmp_path / "run")])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'run'} has no model.npz (a run writes it when it ends, unless "
        "export_npz is off) nor a saved checkpoint yet; give a run directory that has one, or "
        "--checkpoint FILE.npz\n"
    )


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        predict.main(
            [
                str(tmp_path / "cat.jpg"),
                "--model",
                "ViT-B_16",
                "--checkpoint",
                str(tmp_path / "ViT-B_16.npz"),
            ]
        )
    assert e.value.code == 2
    assert "gs://vit_models" in capsys.readouterr().err


def test_repeated_calls_reuse_the_compiled_forward_pass(caplog):
    # top_k and attention_weights compile once per model and input shape: a new jitted function per
    # call compiled again every time (2.1 s per top_k call for two ViT-B/16 images on 2 CPU cores).
    from vit_jax import visualize

    model = models.get_model("testing", num_classes=3, hidden_size=24)  # a model no test used
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    images = np.zeros((2, 32, 32, 3), np.float32)
    with jax.log_compiles(), caplog.at_level("WARNING"):
        for _ in range(2):
            first = predict.top_k(model, params, images, ["a", "b", "c"], k=1)
            weights = visualize.attention_weights(model, params, images)
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]
    assert sum("probabilities" in m for m in compiled) == 1
    assert sum("jit(weights)" in m for m in compiled) == 1
    assert len(first) == 2 and weights[0].shape == (2, 2, 5, 5)


def test_out_of_memory_is_one_line_that_names_the_batch(tmp_path, capsys, monkeypatch):
    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 30 bytes.")

    monkeypatch.setattr(predict, "predict", exhausted)
    images = _images(tmp_path / "images", corrupt=False)
    with pytest.raises(SystemExit) as e:
        predict.main([str(images), "--checkpoint", str(_checkpoint(tmp_path / "m.npz"))])
    assert e.value.code == 2
    assert re.fullmatch(
        r"error: out of memory predicting batches of 32 images \(RESOURCE_EXHAUSTED: Out of "
        r"memory allocating 30 bytes\.\); a cpu device has \d+\.\d GiB; use a smaller --batch\n",
        capsys.readouterr().err,
    )
