"""Fine-tuning: end-to-end runs (mock CIFAR-10, image folder, digits), accumulation, devices, resume."""

import collections
import concurrent.futures
import errno
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tests.test_parallel import devices_env
from vit_jax import checkpoint, evaluate, input_pipeline, models, parallel, predict, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(dataset="digits", **overrides):
    c = train.preset(dataset, "runlocal")
    c.model_overrides = dict(
        hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1, patch_size=(4, 4)
    )
    c.image_size, c.batch, c.batch_eval = 8, 8, 16
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 1, 4, 2
    c.progress = False
    for key, value in overrides.items():
        c[key] = value
    return c


def rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_mock_cifar10_run_evaluates_every_example(tmp_path):
    config = tiny_config("cifar10", image_size=32, batch_eval=16)
    config.model_overrides = dict(hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1)
    with tfds.testing.mock_data(num_examples=37):
        result = train.train_and_evaluate(config, str(tmp_path))
    assert result["num_examples"] == 37  # 16 + 16 + 5 (padded and masked), none dropped
    assert sum(result["support"]) == 37 and np.sum(result["confusion_matrix"]) == 37
    logged = rows(tmp_path)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert {"step", "train_loss", "learning_rate", "img_sec_core"} <= set(logged[0])
    schedule = train.make_schedule(config)  # the rate each logged step trained with
    expected = [float(schedule(step - 1)) for step in (1, 2, 3, 4)]
    np.testing.assert_allclose([r["learning_rate"] for r in logged], expected, rtol=1e-6)
    assert len(set(expected)) == 4  # (warmup: a different rate at each step)
    assert "accuracy" in logged[-1] and "accuracy" not in logged[0]
    for name in ("model.npz", "curves.png", "eval.json", "report.txt"):
        assert os.path.exists(tmp_path / name), name
    report = (tmp_path / "report.txt").read_text().splitlines()
    assert report[0].startswith("test accuracy ") and report[2].split()[0] == "0"
    assert len(report) == 2 + 10 + 1 + 10  # header, classes, confusion matrix (mock: names 0-9)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
    exported = checkpoint.load(str(tmp_path / "model.npz"))
    assert exported["head"]["kernel"].shape == (16, 10)


def _write_folder(root, corrupt=False):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for cls, channel in (("red", 0), ("blue", 2)):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(10, 30, size=2)
                pixels = np.zeros((h, w, 3), np.uint8)
                pixels[..., channel] = 200
                mode = ("RGB", "L", "RGBA")[i % 3]
                Image.fromarray(pixels).convert(mode).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "red" / "broken.jpg").write_bytes(b"this is not a jpeg")
    return root


def test_image_folder_run(tmp_path, monkeypatch, capsys):
    root = _write_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    config = tiny_config("data", batch_eval=4, eval_every=2)  # a relative path
    scans = []
    scan = input_pipeline._folder_files
    monkeypatch.setattr(
        input_pipeline,
        "_folder_files",
        lambda root, split, *a: scans.append(split) or scan(root, split, *a),
    )
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["num_examples"] == 6  # every test image, the last batch padded
    assert scans == ["train", "test"]  # each split checked once, not at every evaluation
    # Recorded as an absolute path: evaluate finds the run's data from any working directory.
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dataset"] == str(root)
    assert [r["step"] for r in rows(tmp_path / "run") if "accuracy" in r] == [2, 4]
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["class_names"] == [
        "blue",
        "red",
    ]
    # Class names are there from the start: predictions from an unfinished run are labelled.
    run = tmp_path / "run"
    assert (run / "labels.txt").read_text() == "blue\nred\n"
    (run / "model.npz").unlink()
    (run / "eval.json").unlink()
    image = str(root / "test" / "red" / "0.png")
    capsys.readouterr()
    for source in (["--workdir", str(run)], ["--checkpoint", str(run / "checkpoints")]):
        predict.main([image, *source, "--json", "--top_k", "2"])
        out, err = capsys.readouterr()
        labels = [p["label"] for p in json.loads(out)["results"][0]["predictions"]]
        assert sorted(labels) == ["blue", "red"]
        assert ("using its latest checkpoint, step 4" in err) == (source[0] == "--workdir")


def test_unreadable_image_is_named_or_skipped(tmp_path):
    root = _write_folder(tmp_path / "data", corrupt=True)
    config = tiny_config(str(root))
    with pytest.raises(input_pipeline.DataError, match=r"unreadable image .*broken\.jpg"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    config.skip_bad_images = True
    info = input_pipeline.get_info(config)
    files, _, bad, *_ = input_pipeline._folder_files(str(root), "train", info.class_names, True)
    assert len(files) == 12 and [os.path.basename(path) for path, _ in bad] == ["broken.jpg"]
    assert train.train_and_evaluate(config, str(tmp_path / "run2"))["num_examples"] == 6


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_images_beyond_pils_size_limit_are_left_to_tensorflow(tmp_path, monkeypatch):
    # PIL refuses to open images over Image.MAX_IMAGE_PIXELS (a DecompressionBombError, not an
    # OSError); TensorFlow decodes them, so the scan must not stop on them.
    root = _write_folder(tmp_path / "data")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # errors above 2x this: 20x20 px and up
    files, _, bad, *_ = input_pipeline._folder_files(str(root), "train", ["blue", "red"], False)
    assert len(files) == 12 and not bad


def test_images_tensorflow_cannot_decode_are_found_before_training(tmp_path, capsys, monkeypatch):
    # PIL reads all of these; TensorFlow's decoder, which training uses, fails on the TIFF and the
    # 1-bit BMP (mid-run, whenever the shuffle reached them) and reads a palette BMP's indices as
    # grey levels. WebP works; a file with another extension is left out, and said so.
    root = _write_folder(tmp_path / "data")
    pixels = np.random.default_rng(1).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    red = root / "train" / "red"
    Image.fromarray(pixels).save(red / "x.webp", lossless=True)
    Image.fromarray(pixels).convert("1").save(red / "one_bit.bmp")
    Image.fromarray(pixels).convert("P").save(red / "palette.bmp")
    Image.fromarray(pixels).save(red / "scan.png", format="TIFF")
    (red / "notes.txt").write_text("not an image")
    whole = io.BytesIO()
    Image.fromarray(np.tile(pixels, (8, 8, 1))).save(whole, format="JPEG")  # header intact
    (red / "cut_short.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) * 2 // 3])
    config = tiny_config(str(root))
    with pytest.raises(input_pipeline.DataError) as e:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert str(e.value).startswith(
        f"unreadable image {red / 'cut_short.jpg'} (TensorFlow cannot decode it: "
        "jpeg::Uncompress failed. Invalid JPEG data or crop window.) and 3 more; remove or replace"
    )
    info = input_pipeline.get_info(config)
    files, _, bad, ignored, *_ = input_pipeline._folder_files(
        str(root), "train", info.class_names, True
    )
    assert [(os.path.basename(path), reason) for path, reason in bad] == [
        ("cut_short.jpg", bad[0][1]),  # PIL's verify passes it
        ("one_bit.bmp", "a 1-bit BMP, which TensorFlow does not decode"),
        ("palette.bmp", "a palette BMP, whose colours TensorFlow decodes as grey levels"),
        ("scan.png", "a TIFF file, which TensorFlow does not decode"),
    ]
    assert ignored == [str(red / "notes.txt")] and str(red / "x.webp") in files
    assert len(files) == 13  # 12 PNGs and the WebP
    config.skip_bad_images = True
    capsys.readouterr()
    train.train_and_evaluate(config, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert (
        f"train: skipped 4 unreadable image(s) (--config.skip_bad_images), e.g. "
        f"{red / 'cut_short.jpg'} (TensorFlow cannot decode it: jpeg::Uncompress failed."
    ) in out
    assert "train: ignored 1 file(s) whose extension is not one of " in out
    assert out.count("train: skipped") == 1 and "test: skipped" not in out

    tiff_only = _write_folder(tmp_path / "tiff_only")
    for png in (tiff_only / "train").rglob("*.png"):
        Image.open(png).convert("RGB").save(png, format="TIFF")
    with pytest.raises(
        input_pipeline.DataError, match=r"all 12 were skipped as unreadable, e\.g\."
    ):
        input_pipeline._folder_files(str(tiff_only), "train", ["blue", "red"], True)

    # Should one get past the checks, the decoding error is still one clear error.
    monkeypatch.setenv("VIT_JAX_CACHE", str(tmp_path / "no_cache"))  # the scans above are kept
    monkeypatch.setattr(input_pipeline, "_not_decodable", lambda image_format, mode: None)
    monkeypatch.setattr(
        input_pipeline, "_tf_decode", lambda paths: ({}, {p: i for i, p in enumerate(paths)})
    )
    config.skip_bad_images, config.total_steps = False, 40  # 40 batches of 8: every image
    with pytest.raises(input_pipeline.DataError) as e:
        train.train_and_evaluate(config, str(tmp_path / "run3"))
    assert str(e.value).startswith("TensorFlow could not decode an image of ")
    assert "{{" not in str(e.value) and "Convert the dataset's images to PNG or JPEG" in str(
        e.value
    )


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer"]
CIFAR10_NAMES += ["dog", "frog", "horse", "ship", "truck"]


def _fake_cifar10_archive(root, per_file=2, test=6):
    """What TFDS finds after downloading and extracting cifar-10-binary.tar.gz, in small: the
    published binary layout (1 label byte, then 3x32x32 pixels, per record) and batches.meta.txt."""
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    (d / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")
    files = [(f"data_batch_{i}.bin", per_file) for i in range(1, 6)] + [("test_batch.bin", test)]
    for index, (name, n) in enumerate(files):
        labels = (np.arange(n) + index) % 10
        records = [np.concatenate([[y], rng.integers(0, 256, 3072)]) for y in labels]
        (d / name).write_bytes(np.asarray(records, np.uint8).tobytes())
    return root


def test_tfds_download_and_prepare_run_for_real(tmp_path, monkeypatch):
    # TFDS's real download_and_prepare, with only the fetch of the archive replaced: the code up to
    # there must import (TFDS needs importlib_resources, which it does not declare), CIFAR-10's
    # class names come from the download, and a failed download is one DataError before any work.
    config = tiny_config("cifar10", tfds_data_dir=str(tmp_path / "tfds"), batch_eval=4)
    builder = tfds.builder("cifar10", data_dir=config.tfds_data_dir)
    assert any("cifar-10-binary" in url for url in builder.url_infos)  # checksums in TFDS
    assert input_pipeline.get_info(config).class_names[:2] == ["0", "1"]  # not downloaded yet

    # A machine that reaches none of the hosts is told so at once, before TFDS's 3.4 minutes of
    # retries, and nothing is written.
    tried = []

    def no_network(address, timeout=None):
        tried.append(address)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_network)
    started = time.monotonic()
    with pytest.raises(input_pipeline.DataError) as e:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert time.monotonic() - started < 30
    assert [host for host, _ in tried] == [
        "www.cs.toronto.edu",
        "storage.googleapis.com",
        "www.googleapis.com",
    ]
    assert str(e.value).startswith(
        "cannot download the TFDS dataset 'cifar10': this machine reaches none of the hosts it "
        "comes from (www.cs.toronto.edu: [Errno -2] Name or service not known). On a machine with "
        'a network, prepare it with `python -c "import tensorflow_datasets as tfds; '
        "tfds.builder('cifar10').download_and_prepare()\"` and copy its folder "
        f"(~/tensorflow_datasets/cifar10/) to {tmp_path / 'tfds' / 'cifar10'}/ here"
    )
    assert not (tmp_path / "run").exists() and not (tmp_path / "tfds").exists()

    # A machine that reaches one (faked here: the test machines have no network) goes on to TFDS.
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: io.BytesIO())
    fetched = []

    def offline(self, url):
        fetched.append(url)
        raise ConnectionError("Failed to resolve 'www.cs.toronto.edu'")

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", offline)
    with pytest.raises(input_pipeline.DataError) as e:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert fetched == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
    assert str(e.value).startswith("could not download or prepare the TFDS dataset 'cifar10' in ")
    assert "(ConnectionError: Failed to resolve 'www.cs.toronto.edu')" in str(e.value)
    assert not (tmp_path / "run").exists()

    archive = _fake_cifar10_archive(tmp_path / "extracted")
    monkeypatch.setattr(
        tfds.download.DownloadManager, "download_and_extract", lambda self, url: str(archive)
    )
    config.test_split = "validation"  # CIFAR-10 has none: found before any training step
    with pytest.raises(input_pipeline.DataError) as e:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert str(e.value).startswith("TFDS dataset 'cifar10' has no split 'validation' (")
    assert "its splits: train, test. Choose one with --config.test_split=..." in str(e.value)
    config.test_split = "train[50%:]"  # half of it is in the preset's train split, train[:98%]
    with pytest.raises(input_pipeline.DataError) as e:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert str(e.value).startswith(
        "the train split 'train[:98%]' and the test split 'train[50%:]' of TFDS dataset 'cifar10' "
        "share 5 examples, so the test accuracy would count images the model trained on"
    )
    config.train_split = "train[:50%]"  # disjoint now: 5 train, 5 test examples
    assert train.train_and_evaluate(config, str(tmp_path / "halves"))["num_examples"] == 5
    config.train_split = config.test_split = ""
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["num_examples"] == 6 and result["step"] == config.total_steps
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["class_names"] == CIFAR10_NAMES  # learnt from the download in this same run
    # The test file's labels are 5, 6, 7, 8, 9, 0 ((row + file index 5) mod 10).
    assert result["support"] == [1, 0, 0, 0, 0, 1, 1, 1, 1, 1]


def test_unreachable_hosts_are_named_and_a_proxy_is_trusted(monkeypatch):
    for variable in ("https_proxy", "http_proxy", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
        monkeypatch.delenv(variable.upper(), raising=False)
    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        open_url = f"http://127.0.0.1:{listening.getsockname()[1]}/x"
        refused = f"https://127.0.0.1:{closed.getsockname()[1]}/x"
        assert input_pipeline.unreachable([refused, open_url]) is None  # one host is enough
        reason = input_pipeline.unreachable([refused, "ftp://127.0.0.1/x", refused])
        assert (
            reason
            == f"127.0.0.1: {ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))}"
        )
        assert input_pipeline.unreachable(["gs://bucket/x"]) is None  # nothing it can test

        def silent_timeout(address, timeout=None):
            assert timeout == 5.0
            raise TimeoutError  # (its message is empty)

        with monkeypatch.context() as patch:
            patch.setattr(socket, "create_connection", silent_timeout)
            assert input_pipeline.unreachable(["https://x.example/a"]) == "x.example: TimeoutError"
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
        assert input_pipeline.unreachable([refused]) is None  # the proxy reaches it, not us


def test_a_dataset_fetched_by_hand_says_what_to_fetch(tmp_path):
    # TFDS's message ends in its multi-line instructions, which must survive the one-line error.
    config = tiny_config("imagenet2012", tfds_data_dir=str(tmp_path / "tfds"))
    config.tfds_manual_dir = str(tmp_path / "manual")
    with pytest.raises(input_pipeline.DataError) as e:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    message = str(e.value)
    assert message.startswith("the TFDS dataset 'imagenet2012' must be downloaded by hand: ")
    assert f"Manual directory {tmp_path / 'manual'} does not exist or is empty" in message
    assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar." in message
    assert "\n" not in message and not (tmp_path / "run").exists()


def test_tfds_label_feature_is_chosen_and_checked_before_download(tmp_path, monkeypatch):
    # smallnorb's labels are label_category, label_elevation, ...: refused without a download.
    monkeypatch.setattr(
        tfds.core.DatasetBuilder, "download_and_prepare", lambda *a, **k: pytest.fail("download")
    )
    config = tiny_config("smallnorb", tfds_data_dir=str(tmp_path / "tfds"), batch_eval=4)
    with pytest.raises(input_pipeline.DataError) as e:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert str(e.value) == (
        "TFDS dataset 'smallnorb': the label feature 'label' does not exist; its class labels: "
        "label_category, instance, label_elevation, label_azimuth, label_lighting; "
        "choose one with --config.label_key=..."
    )
    config.label_key = "image"
    with pytest.raises(input_pipeline.DataError, match="'image' is not a class label"):
        input_pipeline.get_info(config, download=True)
    with pytest.raises(input_pipeline.DataError, match="has no class-label feature"):
        input_pipeline.get_info(tiny_config("coco/2017"), download=True)
    config.label_key = "label_elevation"  # 9 elevations
    with tfds.testing.mock_data(num_examples=10):
        result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["num_examples"] == 10 and len(result["support"]) == 9
    assert not (tmp_path / "tfds").exists()


def test_an_unknown_dataset_name_suggests_the_nearest_and_a_missing_folder_is_named(tmp_path):
    for name, nearest in (("cifar1O", "cifar10 or cifar100"), ("imagenet", "imagenet2012 or ")):
        with pytest.raises(input_pipeline.DataError) as e:
            input_pipeline.get_info(tiny_config(name))
        assert str(e.value).startswith(f"unknown dataset {name!r}: not a TFDS dataset name")
        assert f"; did you mean {nearest}" in str(e.value) and "\n" not in str(e.value)
    missing = tmp_path / "flowers"
    with pytest.raises(input_pipeline.DataError) as e:
        train.train_and_evaluate(tiny_config(str(missing)), str(tmp_path / "run"))
    assert str(e.value) == (
        f"image folder {missing} not found (a folder ROOT with ROOT/{{train,test}}/<class>/<file>, "
        "or ROOT/<class>/<file>)"
    )
    assert not (tmp_path / "run").exists()


def test_folder_images_in_sub_folders_of_a_class_count(tmp_path):
    root = _write_folder(tmp_path / "data")
    nested = root / "train" / "red" / "2024" / "day1"
    nested.mkdir(parents=True)
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(nested / "late.png")
    (nested / "notes.txt").write_text("not an image")
    for hidden in (root / "train" / ".ipynb_checkpoints", nested / ".thumbs"):  # not classes/images
        hidden.mkdir()
        Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(hidden / "copy.png")
    (nested / "._late.png").write_bytes(b"macOS resource fork, not an image")
    # A linked folder counts (datasets are often assembled with links); a link up the tree does not.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(elsewhere / "linked.png")
    (root / "train" / "red" / "more").symlink_to(elsewhere, target_is_directory=True)
    (nested / "loop").symlink_to(root / "train", target_is_directory=True)
    info = input_pipeline.get_info(tiny_config(str(root)))
    files, labels, _, ignored, *_ = input_pipeline._folder_files(
        str(root), "train", info.class_names, False
    )
    pairs = zip(files, labels, strict=True)
    red = [os.path.relpath(f, root / "train" / "red") for f, y in pairs if y == 1]
    assert red == [f"{i}.png" for i in range(6)] + [
        os.path.join("2024", "day1", "late.png"),
        os.path.join("more", "linked.png"),
    ]
    assert len(files) == 14 and info.class_names == ["blue", "red"]
    assert ignored == [str(nested / "notes.txt")]  # hidden files are neither images nor ignored


def test_folders_without_images_are_not_classes(tmp_path):
    # A zip made on a Mac holds __MACOSX/ (only hidden ._ files); each such folder was a class
    # that no image trained, in the head and in every macro average.
    root = _write_folder(tmp_path / "data")
    for split in ("train", "test"):
        (root / split / "__MACOSX" / "red").mkdir(parents=True)
        (root / split / "__MACOSX" / "red" / "._0.png").write_bytes(b"resource fork")
    (root / "train" / "empty").mkdir()
    (root / "test" / "notes").mkdir()
    (root / "test" / "notes" / "readme.txt").write_text("no images here")
    config = tiny_config(str(root))
    info = input_pipeline.get_info(config, download=True)
    assert info.class_names == ["blue", "red"] and info.num_classes == 2
    assert input_pipeline.data_notes(info, "train") == [
        "train: left out 2 folder(s) without images, which are not classes: __MACOSX, empty"
    ]
    assert input_pipeline.data_notes(info, "test")[0] == (
        "test: left out 2 folder(s) without images, which are not classes: __MACOSX, notes"
    )


def test_folder_problems_are_found_before_training(tmp_path):
    # Each would otherwise surface at the first evaluation, after the training steps before it.
    root = _write_folder(tmp_path / "data")
    config = tiny_config(str(root))
    (root / "test" / "green").mkdir()
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(root / "test" / "green" / "0.png")
    with pytest.raises(
        input_pipeline.DataError, match=r"test has class folders that .*train lacks \(green\)"
    ):
        input_pipeline.get_info(config)
    (root / "test" / "green" / "0.png").unlink()
    (root / "test" / "green").rmdir()
    (root / "test" / "red" / "0.png").write_bytes(b"not a png")  # a test image, checked up front
    with pytest.raises(input_pipeline.DataError, match=r"^unreadable image .*test/red/0\.png"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    for f in (root / "test" / "red").iterdir():
        f.rename(root / "test" / "red" / f"{f.name}.txt")
    for f in (root / "test" / "blue").iterdir():
        f.unlink()
    with pytest.raises(input_pipeline.DataError, match=r"^no images \(.*\) under .*test$"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    for d in (root / "test").iterdir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    (root / "test").rmdir()
    with pytest.raises(input_pipeline.DataError, match=r"has train/ but no test/ \(or val/"):
        input_pipeline.get_info(config)
    assert not (tmp_path / "run").exists()


def test_folder_test_split_from_val_or_held_out_of_a_flat_folder(tmp_path, capsys):
    root = _write_folder(tmp_path / "data")
    (root / "test").rename(root / "val")  # ImageNet's name for it
    config = tiny_config(str(root))
    info = input_pipeline.get_info(config)
    files = input_pipeline._folder_files(str(root), "test", info.class_names, False).files
    assert len(files) == 6 and all(f"{os.sep}val{os.sep}" in f for f in files)
    with pytest.raises(input_pipeline.DataError, match=r"has its own test split .*leave it at 0"):
        input_pipeline.get_info(tiny_config(str(root), test_fraction=0.2))

    # ROOT/<class>/<file>: a share of each class is held out, the same files every time.
    flat = root / "train"
    with pytest.raises(input_pipeline.DataError, match=r"class folders but no test split: hold"):
        input_pipeline.get_info(tiny_config(str(flat)))
    for i in range(6, 10):  # red: 10 images, blue: 6
        Image.fromarray(np.full((12, 12, 3), 20 * i, np.uint8)).save(flat / "red" / f"{i}.png")
    config = tiny_config(str(flat), test_fraction=0.25, batch_eval=4)
    info = input_pipeline.get_info(config)
    assert info.class_names == ["blue", "red"]
    splits = {
        split: input_pipeline._folder_files(str(flat), split, info.class_names, False, 0.25)
        for split in ("train", "test")
    }
    (train_files, train_labels, *_), (test_files, test_labels, *_) = splits.values()
    assert sorted(train_files + test_files) == sorted(str(p) for p in flat.glob("*/*.png"))
    # The images whose names hash into the lowest quarter: blue 0, 2 and red 0, 2, 6, 7, 8.
    assert sorted(os.path.relpath(f, flat) for f in test_files) == [
        f"{cls}/{i}.png"
        for cls, i in [("blue", 0), ("blue", 2), *(("red", i) for i in (0, 2, 6, 7, 8))]
    ]
    assert np.bincount(test_labels).tolist() == [2, 5]
    assert np.bincount(train_labels).tolist() == [4, 5]
    again = input_pipeline._folder_files(str(flat), "test", info.class_names, False, 0.25)
    assert again.files == test_files
    with pytest.raises(
        train.TrainingError,
        match=r"run directory .*first is inside the image folder .*train, whose sub",
    ):
        train.train_and_evaluate(config, str(flat / "runs" / "first"))
    assert not (flat / "runs").exists()
    # Runs made on other data before are not classes or images; a folder that only has a
    # config.json is not a run.
    png = flat / "red" / "0.png"
    for run, marker in ((flat / "runs" / "old", "labels.txt"), (flat / "red" / "r", "checkpoints")):
        run.mkdir(parents=True)
        (run / "config.json").write_text("{}")
        (run / marker).mkdir() if marker == "checkpoints" else (run / marker).write_text("a\n")
        shutil.copy(png, run / "curves.png")
    (flat / "red" / "settings").mkdir()
    (flat / "red" / "settings" / "config.json").write_text("{}")
    Image.fromarray(np.full((12, 12, 3), 7, np.uint8)).save(flat / "red" / "settings" / "kept.png")
    assert input_pipeline.get_info(config).class_names == ["blue", "red"]
    files = input_pipeline._folder_files(str(flat), "train", ["blue", "red"], False, 0.25)
    assert list(files.runs) == [str(flat / "red" / "r")]
    held_out = input_pipeline._folder_files(str(flat), "test", ["blue", "red"], False, 0.25)
    assert held_out.runs == ()  # (the train split's log names it)
    assert str(flat / "red" / "settings" / "kept.png") in files.files
    assert not any("curves" in f for f in files.files) and len(files.files) == 10
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["num_examples"] == 7
    out = capsys.readouterr().out
    assert f"test: 7 images (41.2% of the images), about 25% of each class of {flat}, held" in out
    assert "train: left out 1 folder(s) without images, which are not classes: runs" in out
    assert (
        "train: left out 1 vit_jax run folder(s) inside class folders (their PNGs are not data), "
        f"e.g. {flat / 'red' / 'r'}"
    ) in out
    # Four more red images, all hashing above the cut-off: the test split stays as it was (taking
    # the lowest round(0.25 * 14) = 4 of red instead would move red 7 and 8, trained on, into it).
    for i in range(10, 14):
        Image.fromarray(np.full((12, 12, 3), 9 * i, np.uint8)).save(flat / "red" / f"{i}.png")
    later = input_pipeline._folder_files(str(flat), "test", info.class_names, False, 0.25)
    assert later.files == test_files
    # One image a class: nothing can be held out, and the message says why.
    single = tmp_path / "single"
    for cls in ("blue", "red"):
        (single / cls).mkdir(parents=True)
        shutil.copy(png, single / cls / "0.png")
    with pytest.raises(
        input_pipeline.DataError,
        match=r"^no images in the held-out test split of .*single: a class folder gives it an "
        r"image only when it holds 2 or more, and none does; add images, or put test images",
    ):
        input_pipeline._folder_files(str(single), "test", ["blue", "red"], False, 0.5)


def test_held_out_images_stay_where_they_are_when_images_are_added():
    names = [f"/d/img{i}.jpg" for i in range(1500)]
    before = input_pipeline._held_out(names[:1000], "/d", 0.1)
    after = input_pipeline._held_out(names, "/d", 0.1)
    assert len(before) == 89 and len(after) == 143  # about 10 %
    assert after & set(names[:1000]) == before  # no image moved to the other split
    # Small classes: one image on each side, the lowest and the highest hash.
    assert input_pipeline._held_out(["/d/a.png"], "/d", 0.5) == set()
    two = ["/d/0.png", "/d/1.png"]  # hashes 0.06 and 0.58 of the range
    assert input_pipeline._held_out(two, "/d", 0.01) == {"/d/0.png"}
    assert input_pipeline._held_out(two, "/d", 0.99) == {"/d/0.png"}
    assert input_pipeline._held_out(two, "/d", 0.3) == {"/d/0.png"}


def test_scan_cache_decodes_only_new_and_changed_images(tmp_path, monkeypatch, capsys):
    root = _write_folder(tmp_path / "data", corrupt=True)  # broken.jpg: PIL rejects it
    whole = io.BytesIO()
    noise = np.random.default_rng(2).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(whole, format="JPEG")
    cut = root / "train" / "red" / "cut_short.jpg"  # PIL passes it; TensorFlow fails
    cut.write_bytes(whole.getvalue()[: len(whole.getvalue()) * 2 // 3])
    decoded = []
    decode = input_pipeline._tf_decode
    monkeypatch.setattr(
        input_pipeline, "_tf_decode", lambda paths: decoded.append(len(paths)) or decode(paths)
    )

    def scan():
        return input_pipeline._folder_files(str(root), "train", ["blue", "red"], True)

    first = scan()
    assert decoded == [13] and first.cached == 0 and len(first.files) == 12
    again = scan()
    assert decoded == [13, 0] and again.cached == 13
    assert again.files == first.files and again.bad == first.bad  # the broken file's reason too
    np.testing.assert_array_equal(again.fingerprints, first.fingerprints)

    changed = root / "train" / "red" / "1.png"
    Image.fromarray(np.full((12, 12, 3), 9, np.uint8)).save(changed)
    (root / "train" / "blue" / "0.png").unlink()
    third = scan()
    assert decoded == [13, 0, 1] and third.cached == 11 and len(third.files) == 11
    position = third.files.index(str(changed))
    assert third.fingerprints[position] != first.fingerprints[first.files.index(str(changed))]
    with open(input_pipeline._scan_cache_path(str(root / "train"))) as f:
        cache = json.load(f)
    assert sorted(cache["files"]) == sorted(
        os.path.relpath(path, root / "train") for path in [*third.files, str(cut)]
    )
    assert [os.path.basename(path) for path, _ in third.bad] == ["broken.jpg", "cut_short.jpg"]

    # A damaged cache is ignored and replaced; an unwritable one only costs the decoding.
    with open(input_pipeline._scan_cache_path(str(root / "train")), "w") as f:
        f.write('{"format": 1, "files": [')
    assert scan().cached == 0 and scan().cached == 12
    with open(input_pipeline._scan_cache_path(str(root / "train")), "w") as f:
        json.dump({**cache, "files": [1, 2]}, f)  # valid JSON, not a cache
    assert scan().cached == 0 and scan().cached == 12
    monkeypatch.setenv("VIT_JAX_CACHE", str(cut))  # a file: no cache folder can be made there
    assert scan().cached == 0 and decoded[-1] == 12

    monkeypatch.setenv("VIT_JAX_CACHE", str(tmp_path / "cache"))
    config = tiny_config(str(root), skip_bad_images=True)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    train.train_and_evaluate(config, str(tmp_path / "run2"))
    out = capsys.readouterr().out
    assert out.count("train: 12 images unchanged since an earlier run decoded them were not") == 1
    assert "test: 6 images unchanged" in out


def test_test_images_that_copy_training_images_are_left_out(tmp_path, capsys):
    root = _write_folder(tmp_path / "data")
    train_red, test_red = root / "train" / "red", root / "test" / "red"
    shutil.copy(train_red / "4.png", test_red / "copy.png")
    shutil.copy(train_red / "5.png", root / "test" / "blue" / "relabelled.png")
    # The same pixels saved again (other bytes) is not a copy of the file.
    Image.open(train_red / "3.png").save(test_red / "resaved.png", compress_level=1)
    config = tiny_config(str(root), batch_eval=4)
    info = input_pipeline.get_info(config, download=True)
    test = info.details["test_scan"]
    assert len(test.files) == 7 and str(test_red / "resaved.png") in test.files
    assert sorted(info.details["test_copies"]) == [
        (str(root / "test" / "blue" / "relabelled.png"), str(train_red / "5.png")),
        (str(test_red / "copy.png"), str(train_red / "4.png")),
    ]
    assert len(info.details["train_scan"].files) == 12  # training keeps every image
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["num_examples"] == 7
    out = capsys.readouterr().out
    assert "test: left out 2 image(s) that are byte-for-byte copies of training images" in out

    # A held-out split drops a file that has a twin among the training files of its class.
    flat = tmp_path / "flat"
    shutil.copytree(root / "train", flat)
    for i in range(6):
        shutil.copy(flat / "blue" / "0.png", flat / "blue" / f"again{i}.png")
    config = tiny_config(str(flat), test_fraction=0.5)
    info = input_pipeline.get_info(config, download=True)
    held_out = input_pipeline._folder_files(str(flat), "test", info.class_names, False, 0.5)
    test_files = info.details["test_scan"].files
    twins = {str(flat / "blue" / f"again{i}.png") for i in range(6)} | {
        str(flat / "blue" / "0.png")
    }
    dropped = set(held_out.files) - set(test_files)
    assert dropped and dropped <= twins and not set(test_files) & twins
    assert len(info.details["test_copies"]) == len(dropped)

    # A test/ that is train/ again is refused: nothing unseen would be left to score.
    shutil.rmtree(root / "test")
    os.symlink(root / "train", root / "test")
    with pytest.raises(
        input_pipeline.DataError, match=r"every one of the 12 test images is a copy"
    ):
        input_pipeline.get_info(tiny_config(str(root)), download=True)


def test_report_counts_support_as_integers_when_predictions_miss():
    # sklearn gives float supports when a class is never predicted right; the report formats ints.
    mesh = parallel.data_mesh()
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    def always_class_1(params, batch):
        return jnp.ones_like(batch["label"]), jnp.full(batch["label"].shape, 0.5)

    batch = {"image": np.zeros((4, 2), np.float32), "label": np.array([0, 0, 0, 2])}
    batch["mask"] = np.array([1, 1, 1, 0])  # the last row is padding
    metrics = train.evaluate(always_class_1, None, iter([batch]), sharding, 3)
    assert metrics["support"] == [3, 0, 0] and metrics["accuracy"] == 0.0
    assert metrics["confusion_matrix"] == [[0, 3, 0], [0, 0, 0], [0, 0, 0]]
    report = train.format_report(metrics, ["cat", "dog", "eel"])
    assert report.splitlines()[2].split() == ["cat", "0.000", "0.000", "0.000", "3"]


def test_report_of_many_classes_prints_the_worst_and_keeps_all_in_the_file():
    f1 = [0.9, 0.2, 0.5, 0.0, 0.8]
    metrics = {
        "accuracy": 0.5, "num_examples": 10, "test_loss": 1.25,
        "precision": [1.0, 0.5, 0.5, 0.0, 1.0], "recall": [0.8, 0.1, 0.5, 0.2, 0.6], "f1": f1,
        "support": [2, 2, 2, 0, 2], "confusion_matrix": np.eye(5, dtype=int).tolist(),
    }  # fmt: skip
    names = ["a", "b", "c", "d", "e"]
    short = train.format_report(metrics, names, max_classes=2).splitlines()
    assert short[0] == (
        "test accuracy 0.5000 on 10 examples (loss 1.2500); macro precision 0.750, "
        "recall 0.500, f1 0.600 over the 4 of 5 classes with examples"
    )
    assert short[1] == "the 2 classes with the lowest f1 (all 5 in report.txt):"
    assert [row.split()[0] for row in short[3:5]] == ["b", "c"]  # d has no test examples
    full = train.format_report(metrics, names).splitlines()
    assert [row.split()[0] for row in full[2:7]] == names and full[7].startswith("confusion")


def test_preprocessing_ranges_and_grayscale_to_rgb():
    config = tiny_config(image_size=12)
    info = input_pipeline.get_info(config)
    batch = next(input_pipeline.train_batches(config, info, 8))
    assert batch["image"].shape == (8, 12, 12, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])  # gray -> RGB
    evals = list(input_pipeline.eval_batches(config, info, 100))
    assert sum(int(b["mask"].sum()) for b in evals) == 360 and evals[-1]["mask"][60:].sum() == 0


def test_pipelines_run_without_the_autotuner_whose_thread_delays_their_deletion(monkeypatch):
    # Deleting an iterator waits for tf.data's model-autotuning thread, which wakes at most every
    # 60 s: the end of a run, or of an evaluation, waited up to a minute for it.
    tf = input_pipeline._tf()
    seen = []
    real = tf.data.Dataset.as_numpy_iterator

    def recording(ds):
        seen.append(ds.options().autotune.enabled)
        return real(ds)

    monkeypatch.setattr(tf.data.Dataset, "as_numpy_iterator", recording)
    config = tiny_config()
    info = input_pipeline.get_info(config)
    assert next(input_pipeline.train_batches(config, info, 8))["image"].shape == (8, 8, 8, 3)
    assert sum(len(b["label"]) for b in input_pipeline.eval_batches(config, info, 100)) == 400
    assert seen == [False, False]
    assert input_pipeline.parallel_calls() == len(os.sched_getaffinity(0))


def test_data_order_resumes_exactly():
    config = tiny_config()
    info = input_pipeline.get_info(config)
    full = input_pipeline.train_batches(config, info, 8)
    batches = [next(full) for _ in range(5)]
    resumed = next(input_pipeline.train_batches(config, info, 8, start_step=3))
    np.testing.assert_array_equal(resumed["image"], batches[3]["image"])
    np.testing.assert_array_equal(resumed["label"], batches[3]["label"])


def test_loss_decreases_on_digits(tmp_path):
    config = tiny_config(total_steps=250, eval_every=250, checkpoint_every=250, log_every=25)
    config.optimizer, config.base_lr, config.warmup_steps, config.batch = "adamw", 3e-3, 5, 32
    config.crop_area, config.momentum_dtype = (0.9, 1.0), "float32"
    config.model_overrides = dict(
        hidden_size=32,
        mlp_dim=64,
        num_heads=2,
        num_layers=1,
        patch_size=(2, 2),
        dropout_rate=0.0,
        classifier="gap",
    )
    result = train.train_and_evaluate(config, str(tmp_path))
    losses = [r["train_loss"] for r in rows(tmp_path)]
    assert losses[-1] < 0.6 * losses[0], losses
    assert result["accuracy"] > 0.5


# (accum_steps, cpu_block_tokens in tokens per image, micro-batches): the testing model at 32 px
# sees 5 tokens per image; blocks of at most 2 images cut each 8 (or 4) rows into 4.
@pytest.mark.parametrize("accum, block_images, micro", [(2, 0, 2), (1, 2, 4), (2, 2, 4), (2, 1, 8)])
def test_accumulation_and_cpu_blocks_equal_one_big_batch(accum, block_images, micro):
    model = models.get_model("testing", num_classes=3, dropout_rate=0.0, hidden_size=16, mlp_dim=16)
    mesh = parallel.data_mesh()
    images = jax.random.uniform(jax.random.key(0), (8, 32, 32, 3), minval=-1, maxval=1)
    labels = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])
    params = model.init(jax.random.key(1), images[:1])["params"]
    params["head"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(2), (16, 3))
    tokens = model.num_tokens(32)
    assert tokens == 5

    def one_step(accum, block_tokens):
        config = tiny_config(accum_steps=accum, batch=8, warmup_steps=0, base_lr=0.1)
        config.cpu_block_tokens = block_tokens
        tx = train.make_optimizer(config)
        step = train.make_train_step(model, tx, config, mesh)
        state = jax.tree.map(jnp.copy, train.initial_state(params, tx))
        # As in the training loop: the batch is on the devices already, the old state's buffers are
        # reused (donated) and nothing moves to the host until the metrics are read.
        with jax.transfer_guard("disallow"):
            new, metrics = step(state, {"image": images, "label": labels})
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))
        return (
            new["params"],
            float(metrics["loss"]),
            train.micro_batches(model, config, images.shape, 1),
        )

    p1, l1, m1 = one_step(1, 0)
    p2, l2, m2 = one_step(accum, block_images * tokens)
    assert (m1, m2) == (1, micro)
    assert abs(l1 - l2) < 1e-6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p2)
    assert not np.allclose(p1["head"]["kernel"], params["head"]["kernel"])


# (accum_steps, images per CPU block, cpu_blocks_at_once, micro-batches, loop trips side by side):
# 8 rows of the testing model at 32 px (5 tokens an image).
@pytest.mark.parametrize(
    "accum, block_images, at_once, micro, trips",
    [(1, 2, 0, 4, 2), (1, 1, 2, 8, 4), (1, 1, 3, 8, 2), (2, 2, 0, 4, 2), (2, 0, 2, 2, 2)],
)
def test_cpu_blocks_side_by_side_give_the_same_update(accum, block_images, at_once, micro, trips):
    model = models.get_model("testing", num_classes=3, dropout_rate=0.0, hidden_size=16, mlp_dim=16)
    mesh = parallel.data_mesh()
    images = jax.random.uniform(jax.random.key(0), (8, 32, 32, 3), minval=-1, maxval=1)
    batch = {"image": images, "label": jnp.array([0, 1, 2, 0, 1, 2, 0, 1])}
    params = model.init(jax.random.key(1), images[:1])["params"]
    params["head"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(2), (16, 3))

    def one_step(at_once):
        config = tiny_config(accum_steps=accum, batch=8, warmup_steps=0, base_lr=0.1)
        config.cpu_block_tokens = block_images * model.num_tokens(32)
        config.cpu_blocks_at_once = at_once
        tx = train.make_optimizer(config)
        step = train.make_train_step(model, tx, config, mesh)
        state = jax.tree.map(jnp.copy, train.initial_state(params, tx))
        text = step.lower(state, batch).compile().as_text()
        new, metrics = step(state, batch)
        trips = re.findall(r'known_trip_count":\{"n":"(\d+)"', text)
        return new["params"], float(metrics["loss"]), [int(n) for n in trips]

    p1, l1, loops1 = one_step(1)
    p2, l2, loops2 = one_step(at_once)
    # One loop over the micro-batches, one a trip; side by side it takes `at_once` a trip (0, the
    # default, is 2 for a model this narrow; XLA may peel a remainder). accum_steps alone (no CPU
    # blocks: as on GPU/TPU) stays one a trip, since two at once would double the memory that
    # accumulation is there to save.
    assert loops1 == [micro]
    assert loops2 == [trips]
    assert abs(l1 - l2) < 1e-6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p1, p2)
    assert not np.allclose(p2["head"]["kernel"], params["head"]["kernel"])


def test_blocks_side_by_side_by_default_up_to_vit_b_width():
    assert train.default_config().cpu_blocks_at_once == 0  # auto
    widths = [models.get_model(name).hidden_size for name in ("ViT-Ti_16", "ViT-B_16", "ViT-L_16")]
    assert [parallel.train_blocks_at_once(w) for w in widths] == [2, 2, 1]
    assert parallel.train_blocks_at_once(1024, 3) == 3  # asked for
    assert parallel.blocks_at_once(1, 2) == 1 and parallel.blocks_at_once(8, 3) == 3


def test_the_start_up_line_says_how_many_blocks_run_side_by_side(tmp_path, capsys):
    # 5 tokens per image (8 px, 4 px patches, class token): blocks of 2 images, 4 per batch of 8.
    for at_once, says in ((0, "(4 micro-batches, 2 at a time), "), (1, "(4 micro-batches), ")):
        config = tiny_config(total_steps=1, eval_every=1, cpu_block_tokens=10)
        config.cpu_blocks_at_once = at_once
        train.train_and_evaluate(config, str(tmp_path / str(at_once)))
        assert f" batch 8 {says}steps 0->1, " in capsys.readouterr().out


def test_the_gpu_and_tpu_training_steps_lower_for_them(monkeypatch):
    # The step as an H100 and a TPU would compile it (bfloat16, the fused attention, the whole
    # batch at once), lowered for them on this CPU. Its class token makes 5 tokens, odd like 197.
    from jax._src.cudnn import fused_attention_stablehlo  # JAX's cuDNN attention

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
    monkeypatch.setattr(models, "use_fused_attention", lambda: True)
    monkeypatch.setattr(models, "on_xla_cpu", lambda: False)
    model = models.get_model(
        "testing", num_classes=3, num_layers=2, hidden_size=16, num_heads=2, mlp_dim=16,
        patch_size=(4, 4), dtype=jnp.bfloat16,
    )  # fmt: skip
    config = tiny_config(cpu_block_tokens=0)
    tx = train.make_optimizer(config)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    state = jax.eval_shape(lambda p: train.initial_state(p, tx), params["params"])
    batch = {
        "image": jax.ShapeDtypeStruct((8, 8, 8, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((8,), jnp.int32),
    }
    cudnn = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")
    unchecked = [jax.export.DisabledSafetyCheck.custom_call(name) for name in cudnn]

    def lowered(fn, platform, *args):
        """The StableHLO text of `fn(*args)` exported for `platform`, and its custom calls."""
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no falling back to XLA's attention
            exported = jax.export.export(fn, platforms=(platform,), disabled_checks=unchecked)
            text = exported(*args).mlir_module()
        return text, collections.Counter(re.findall(r'custom_call @"?([\w$]+)', text))

    for platform, capability in (("cuda", (9, 0)), ("tpu", None)):
        monkeypatch.setattr(models, "cuda_compute_capability", lambda device, c=capability: c)
        step = train.make_train_step(model, tx, config, parallel.data_mesh())  # traced anew
        text, calls = lowered(step, platform, state, batch)
        # cuDNN's flash attention forward and backward in the first block on the GPU (the last one
        # asks the class token's query alone, in XLA's attention); XLA's on the TPU.
        assert {name: calls[name] for name in cudnn} == dict.fromkeys(cudnn, 1 if capability else 0)
        # For cuDNN the token sequence is padded from 5 to 6 once (`models.Encoder`, and the
        # gradient's negative pad), not q, k and v in every layer. The other pads are the gradients
        # of the last block's class-token slices (of its input, and of its LayerNorm's output).
        pads = re.findall(
            r"stablehlo.pad .*: \(tensor<(\S+)>, tensor<\w+>\) -> tensor<(\S+)>", text
        )
        pads = [(a, b) for a, b in pads if a != b]  # jax 0.8 adds a no-op pad, 8x1x16 to 8x1x16
        n = 6 if capability else 5
        class_token = {("8x1x16xf32", f"8x{n}x16xf32"), ("8x1x16xbf16", f"8x{n}x16xbf16")}
        sequence = {("8x5x16xf32", "8x6x16xf32"), ("8x6x16xf32", "8x5x16xf32")}
        assert len(pads) == len(set(pads)) and set(pads) == class_token | (
            sequence if capability else set()
        )
        assert not [name for name in calls if "callback" in name]  # no host round trip in a step
        assert "stablehlo.while" not in text  # no CPU cache blocks
        # Every buffer of the state is donated (reused for the new state).
        assert text.count("tf.aliasing_output") == len(jax.tree.leaves(state))
        dots = re.findall(r"stablehlo.dot_general .*", text)
        # All products in bfloat16 but, in float32, the head's three (forward, two gradients) and
        # per block the three of its value bias carried into the out layer's bias (b_v . W_out).
        assert len(dots) > 20 and len([d for d in dots if "bf16" not in d]) == 3 + 2 * 3
        # The Dense layers' products (forward and two gradients) take flat tokens and give bfloat16,
        # accumulated in float32 in the kernel: the first block's 6 layers and the last block's key
        # and value on all N*L tokens (24), the last block's query, out and MLP on the 8 class
        # tokens alone (12).
        tokens = f"tensor<{8 * (6 if capability else 5)}x"
        patches = "tensor<8x2x2x48xbf16>"  # the patch embedding's (its kernel is 48x16 too)
        dense = [d for d in dots if tokens in d and patches not in d]
        assert len(dense) == 24 and all(re.search(r"-> tensor<\S+xbf16>", d) for d in dense)
        class_tokens = [d for d in dots if re.search(r"\(tensor<8x(16|2x8)xbf16>,", d)]
        assert len(class_tokens) == 12
        assert all(re.search(r"-> tensor<\S+xbf16>", d) for d in class_tokens)
        # Evaluation (and so predictions) runs the same forward kernels.
        eval_step = train.make_eval_step(model, cpu_block_tokens=0)
        _, calls = lowered(eval_step, platform, params["params"], batch)
        assert calls[cudnn[0]] == (1 if capability else 0) and calls[cudnn[1]] == 0


def test_evaluation_in_cpu_blocks_equals_the_whole_batch():
    model = models.get_model("testing", num_classes=3, hidden_size=16, mlp_dim=16)
    images = jax.random.uniform(jax.random.key(0), (12, 32, 32, 3), minval=-1, maxval=1)
    batch = {"image": images, "label": jnp.arange(12) % 3}
    params = model.init(jax.random.key(1), images[:1])["params"]
    params["head"]["kernel"] = jax.random.normal(jax.random.key(2), (16, 3))
    assert parallel.model_blocks(model, images.shape, 1, 3 * 5) == 4
    whole = train.make_eval_step(model, cpu_block_tokens=0)(params, batch)
    blocked = train.make_eval_step(model, cpu_block_tokens=3 * 5)(params, batch)  # 4 blocks of 3
    np.testing.assert_array_equal(blocked[0], whole[0])
    np.testing.assert_allclose(blocked[1], whole[1], rtol=1e-5, atol=1e-6)
    assert len(set(np.asarray(whole[0]).tolist())) > 1  # not a constant prediction


_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    from vit_jax import train
    sys.path.insert(0, {tests!r})
    from test_train import tiny_config
    config = tiny_config(total_steps=5, checkpoint_every=5, eval_every=5, accum_steps=2, batch=16)
    config.model_overrides["dropout_rate"] = 0.1
    result = train.train_and_evaluate(config, sys.argv[1])
    losses = [json.loads(l)["train_loss"] for l in open(sys.argv[1] + "/metrics.jsonl")]
    print(json.dumps({{"devices": jax.device_count(), "losses": losses, "acc": result["accuracy"]}}))
    """
)


def test_eight_devices_give_the_same_losses_as_one(tmp_path):
    script = _DEVICE_SCRIPT.format(tests=os.path.join(REPO, "tests"))

    def run(n: int) -> dict:
        proc = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / f"d{n}")],
            capture_output=True,
            text=True,
            env=devices_env(n),
            timeout=300,
            cwd=REPO,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # side by side: mostly compilation
        out = dict(zip((1, 8), pool.map(run, (1, 8)), strict=True))
    assert out[1]["devices"] == 1 and out[8]["devices"] == 8
    np.testing.assert_allclose(out[8]["losses"], out[1]["losses"], rtol=1e-5)
    assert out[8]["acc"] == out[1]["acc"]


def kill_after_5_batches(monkeypatch):
    """Makes the next run's input raise KeyboardInterrupt after 5 batches; returns the real input."""
    real = input_pipeline.train_batches

    def interrupted(*args, **kwargs):
        it = real(*args, **kwargs)
        for _ in range(5):
            yield next(it)
        raise KeyboardInterrupt("simulated kill after 5 batches")

    monkeypatch.setattr(input_pipeline, "train_batches", interrupted)
    return real


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "vit_jax-prefetch"]


def test_prefetch_moves_batches_ahead_and_stops_when_closed():
    sharding = jax.sharding.NamedSharding(parallel.data_mesh(), jax.sharding.PartitionSpec("data"))
    made, closed = [], []

    def source():  # endless, like the training input
        try:
            for i in range(10**9):
                made.append(i)
                yield {"x": np.full((2, 3), i, np.float32)}
        finally:
            closed.append(True)

    batches = train.prefetch(source(), sharding, size=2)
    for i in range(3):
        batch = next(batches)
        assert isinstance(batch["x"], jax.Array) and float(batch["x"][0, 0]) == i
    deadline = time.monotonic() + 10
    while len(made) < 6 and time.monotonic() < deadline:  # 3 taken, 2 queued, 1 waiting for room
        time.sleep(0.01)
    time.sleep(0.2)
    assert len(made) == 6  # `size` ahead, no further
    batches.close()
    assert not _prefetch_threads() and closed == [True]

    def failing():
        yield {"x": np.zeros((2, 3), np.float32)}
        raise ValueError("unreadable record")

    batches = train.prefetch(failing(), sharding)
    next(batches)
    with pytest.raises(ValueError, match="unreadable record"):
        next(batches)
    assert not _prefetch_threads()


def test_resuming_with_other_settings_is_refused_and_keeps_the_run(tmp_path):
    run = str(tmp_path / "run")
    config = tiny_config(total_steps=2, checkpoint_every=2, eval_every=2)
    train.train_and_evaluate(config, run)
    config.total_steps = 4
    bigger = tiny_config(total_steps=4, image_size=12)  # 3x3 patches instead of 2x2
    with pytest.raises(train.TrainingError) as e:
        train.train_and_evaluate(bigger, run)
    assert str(e.value).startswith(f"{run} holds the checkpoint of a run with other settings")
    assert "params/Transformer/posembed_input/pos_embedding: saved (1, 5, 16), now (1, 10, 16)" in (
        str(e.value)
    )
    with pytest.raises(train.TrainingError, match=r"\(step 2: the saved state holds other arrays"):
        train.train_and_evaluate(tiny_config(total_steps=4, optimizer="adamw"), run)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["2"]
    assert train.train_and_evaluate(config, run)["step"] == 4  # the run itself resumes as before


def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path, monkeypatch):
    config = tiny_config(total_steps=8, checkpoint_every=3, eval_every=8)
    config.model_overrides["dropout_rate"] = 0.1
    train.train_and_evaluate(config, str(tmp_path / "straight"))

    assert not _prefetch_threads()  # a finished run leaves no input thread behind

    real = kill_after_5_batches(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert not _prefetch_threads()  # nor an interrupted one
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["3"]
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train_lo')  # a row cut short: the process was killed writing it
    monkeypatch.setattr(input_pipeline, "train_batches", real)
    train.train_and_evaluate(config, str(tmp_path / "resumed"))

    a = checkpoint.load(str(tmp_path / "straight" / "model.npz"))
    b = checkpoint.load(str(tmp_path / "resumed" / "model.npz"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert [r["step"] for r in rows(tmp_path / "resumed")] == list(range(1, 9))
    # An orbax training checkpoint converts to the published npz layout.
    out = checkpoint.convert(str(tmp_path / "resumed"), str(tmp_path / "from_orbax.npz"))
    jax.tree.map(np.testing.assert_array_equal, checkpoint.load(out), b)
    # ... is inspected like an .npz, and is not mistaken for a broken .npz where one is expected.
    report = checkpoint.inspect(str(tmp_path / "resumed" / "checkpoints"))
    assert "layout: orbax checkpoint written by vit_jax.train (its params)" in report
    assert report == checkpoint.inspect(out).replace(
        f"{out}\nlayout: published",
        f"{tmp_path / 'resumed' / 'checkpoints'}\nlayout: orbax "
        "checkpoint written by vit_jax.train (its params)",
    )
    # checkpoint.load reads the run directory itself; read_npz, for .npz files only, says what to do.
    jax.tree.map(np.testing.assert_array_equal, checkpoint.load(str(tmp_path / "resumed")), b)
    with pytest.raises(
        checkpoint.CheckpointError, match=r"is a directory, not an \.npz; .* convert"
    ):
        checkpoint.read_npz(str(tmp_path / "resumed"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # Warmup makes step 1's learning rate 0: step 1 is checkpointed, then the run diverges.
    config = tiny_config(total_steps=30, checkpoint_every=1, eval_every=100, warmup_steps=2)
    config.base_lr, config.grad_norm_clip, config.optimizer = 1e30, 0.0, "sgd"
    pattern = r"the (training loss|gradient norm) became (nan|inf|-inf) .*at step (\d+); stopped"
    with pytest.raises(train.TrainingError, match=pattern) as e:
        train.train_and_evaluate(config, str(tmp_path))
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    bad_step = int(re.search(pattern, str(e.value)).group(3))
    assert steps and steps[-1] == bad_step - 1
    assert f"last good checkpoint is step {steps[-1]} in" in str(e.value)
    restored = checkpoint.load_orbax_params(str(tmp_path))  # the kept checkpoint is intact
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(restored))


OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 31.23GiB."


class _OutOfMemoryFrom:
    """A jitted step whose calls from the `first`-th on fail as XLA's do when a buffer does not
    fit the device; lowering (the memory analysis) is the real step's."""

    def __init__(self, jitted, first):
        self.jitted, self.first, self.calls = jitted, first, 0

    def lower(self, *args):
        return self.jitted.lower(*args)

    def __call__(self, *args):
        self.calls += 1
        if self.calls >= self.first:
            raise jax.errors.JaxRuntimeError(OOM)
        return self.jitted(*args)


SIZE = r"\d+\.\d+ (GiB|MiB|KiB)"  # commands.byte_size


def _training_error(config, workdir) -> str:
    """The text of the TrainingError that `train_and_evaluate(config, workdir)` raises."""
    with pytest.raises(train.TrainingError) as e:
        train.train_and_evaluate(config, str(workdir))
    return str(e.value)


def _step_memory_error(reason: str, kept: str) -> str:
    """The pattern of a tiny_config run's out-of-memory error in the training step."""
    return (
        rf"out of memory in the training step \({reason}\): micro-batches of 8 images per device "
        rf"at 8x8 need {SIZE} of state and batch and {SIZE} of temporaries per device; a cpu "
        rf"device has {SIZE}\. To fit, try --cpu_block_tokens 20 \(blocks of 4 images, not 8\); "
        rf"--remat \(.*\); a smaller --batch or --image_size\. {kept}"
    )


def test_out_of_memory_in_training_says_what_it_needs_and_what_to_change(tmp_path, monkeypatch):
    make = train.make_train_step
    monkeypatch.setattr(
        train, "make_train_step", lambda *a, **k: _OutOfMemoryFrom(make(*a, **k), first=3)
    )
    config = tiny_config(eval_every=100)
    message = _training_error(config, tmp_path)
    kept = r"Rerun with the same run directory to resume from step 2\."
    assert re.fullmatch(_step_memory_error(re.escape(OOM), kept), message), message
    monkeypatch.undo()
    result = train.train_and_evaluate(config, str(tmp_path))  # resumes from step 2
    assert result["step"] == 4 and [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4]


def test_a_cpu_step_that_would_not_fit_the_host_stops_before_it_runs(tmp_path, monkeypatch):
    # On CPU XLA takes the step's buffers from the host as it runs, and Linux would end the process
    # (status 137, no message): the step's memory analysis is checked against what is left first.
    from vit_jax import commands

    monkeypatch.setattr(commands, "host_memory_left_bytes", lambda: 0)
    config = tiny_config(eval_every=100)
    message = _training_error(config, tmp_path)
    reason = rf"XLA's buffers for it need {SIZE} more, 0\.0 KiB of host memory is left"
    kept = r"No checkpoint had been written yet\."
    assert re.fullmatch(_step_memory_error(reason, kept), message), message
    assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")
    assert rows(tmp_path) == []  # no step ran
    monkeypatch.undo()
    assert train.train_and_evaluate(config, str(tmp_path))["step"] == 4


def test_out_of_memory_in_an_evaluation_saves_the_step_first(tmp_path, monkeypatch):
    make = train.make_eval_step
    monkeypatch.setattr(
        train, "make_eval_step", lambda *a, **k: _OutOfMemoryFrom(make(*a, **k), first=1)
    )
    config = tiny_config(eval_every=3, checkpoint_every=100)
    with pytest.raises(train.TrainingError) as e:
        train.train_and_evaluate(config, str(tmp_path))
    assert str(e.value).startswith(
        f"out of memory evaluating at step 3 ({OOM}): batches of 16 images at 8x8 over 1 "
        "device(s); a cpu device has "
    )
    assert "Step 3 is saved: rerun with the same run directory and a smaller --batch_eval" in str(
        e.value
    )
    assert checkpoint.saved_steps(str(tmp_path / "checkpoints")) == [3]
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3] and "accuracy" not in rows(tmp_path)[2]
    monkeypatch.undo()
    config.batch_eval = 8
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 4 and result["num_examples"] == 360
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4]


@pytest.mark.parametrize("cache_mib, scale", [(32, 1), (480, 4)])
def test_evaluation_blocks_follow_the_cpu_cache(tmp_path, monkeypatch, capsys, cache_mib, scale):
    # Evaluation takes 4x a training block's tokens where the CPU's largest cache is 64 MiB or
    # more: in training (blocks of 40 tokens here) and in the evaluate command (the default 1024).
    monkeypatch.setattr(parallel, "last_level_cache_bytes", lambda: cache_mib * 2**20)
    make, asked = train.make_eval_step, []
    monkeypatch.setattr(
        train, "make_eval_step", lambda m, tokens=None: asked.append(tokens) or make(m, tokens)
    )
    config = tiny_config(total_steps=1, eval_every=1, cpu_block_tokens=40)
    result = train.train_and_evaluate(config, str(tmp_path))
    assert asked == [40 * scale] and result["num_examples"] == 360
    capsys.readouterr()  # training's log
    evaluate.main(["--workdir", str(tmp_path), "--json"])
    assert asked == [40 * scale, 1024 * scale]
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(result["accuracy"])


def test_memory_tips_put_the_settings_that_keep_the_updates_first():
    model = models.get_model("ViT-B_16", num_classes=10)
    config = train.preset("cifar10", "ViT-B_16")  # batch 512, accum_steps 8
    config.dtype = "float32"
    assert train.memory_tips(model, config, (512, 384, 384, 3), 1, "gpu") == [
        "--accum_steps 16 (micro-batches of 32 images per device, not 64; the same updates)",
        "--remat (each block's activations recomputed: about 1/3 more compute)",
        "--dtype bfloat16",
        "a smaller --batch or --image_size",
    ]
    config.dtype, config.remat = "bfloat16", True
    tips = train.memory_tips(model, config, (512, 384, 384, 3), 8, "tpu")
    assert tips == [
        "--accum_steps 16 (micro-batches of 4 images per device, not 8; the same updates)",
        "--shard_params (parameters and optimizer state split over the devices)",
        "a smaller --batch or --image_size",
    ]
    # A T4 (11.1 GiB for XLA's allocator) and XLA's buffers for ViT-B/16 at 384 px in float32,
    # micro-batches of 64 (a compile for its description): micro-batches of 16 fit, 32 do not.
    config.dtype, config.remat = "float32", False
    memory = types.SimpleNamespace(
        argument_size_in_bytes=1.2 * 2**30, temp_size_in_bytes=31 * 2**30
    )
    assert train.memory_tips(model, config, (512, 384, 384, 3), 1, "gpu", memory, 11.1)[0] == (
        "--accum_steps 32 (micro-batches of 16 images per device, not 64, about 7.8 GiB of "
        "temporaries; the same updates)"
    )
    # Too big even one image at a time: the next accum_steps, and the other settings.
    tips = train.memory_tips(model, config, (512, 384, 384, 3), 1, "gpu", memory, 1.5)
    assert tips[:2] == [
        "--accum_steps 16 (micro-batches of 32 images per device, not 64; the same updates)",
        "--remat (each block's activations recomputed: about 1/3 more compute)",
    ]
    config.dtype, config.remat = "bfloat16", True
    config.accum_steps = 64  # one image per device: no smaller micro-batch
    assert train.memory_tips(model, config, (512, 384, 384, 3), 8, "tpu")[0].startswith(
        "--shard_params"
    )
    config = tiny_config(batch=32, image_size=224, accum_steps=1)
    vit_ti = models.get_model("ViT-Ti_16", num_classes=10)
    config.cpu_block_tokens = 0
    assert train.memory_tips(vit_ti, config, (32, 224, 224, 3), 1, "cpu")[0] == (
        "--cpu_block_tokens 1024 (CPU cache blocks, the default)"
    )
    config.cpu_block_tokens = 1024  # 8 blocks of 4 images (197 tokens each), 2 side by side
    assert train.memory_tips(vit_ti, config, (32, 224, 224, 3), 1, "cpu")[:2] == [
        "--cpu_blocks_at_once 1 (a few per cent slower)",
        "--cpu_block_tokens 394 (blocks of 2 images, not 4)",
    ]


def test_the_training_step_compiles_once(tmp_path):
    # The step is compiled ahead of its first call (for XLA's memory figures); the calls reuse it.
    compiled = collections.Counter()

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled[kwargs.get("fun_name")] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        train.train_and_evaluate(tiny_config(), str(tmp_path))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiled["jit(step_fn)"] == 1, compiled


def test_fine_tune_from_published_npz_at_another_resolution(tmp_path):
    pretrained = models.get_model("testing", num_classes=21, representation_size=10)
    params = pretrained.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    checkpoint.save(params, str(tmp_path / "testing.npz"))  # 2x2 grid, pre_logits, 21 classes
    config = tiny_config(total_steps=2, checkpoint_every=2, eval_every=2, image_size=48)
    config.model_overrides = {}
    config.from_scratch, config.vit_pretrained_dir = False, str(tmp_path)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    out = checkpoint.load(str(tmp_path / "run" / "model.npz"))
    assert out["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 10, 10)  # 3x3 + cls
    assert out["head"]["kernel"].shape == (10, 10) and "pre_logits" not in out

    # Another run's directory (its latest orbax checkpoint) is a checkpoint to start from too.
    config.pretrained = str(tmp_path / "run")
    config.image_size = 32
    train.train_and_evaluate(config, str(tmp_path / "run2"))
    before = checkpoint.load_orbax_params(str(tmp_path / "run"))
    after = checkpoint.load(str(tmp_path / "run2" / "model.npz"))
    assert not np.array_equal(before["head"]["kernel"], after["head"]["kernel"])  # trained anew
    # A checkpoint that cannot be used stops the run before its directory exists.
    for bad, message in (
        (str(tmp_path), r"is not an orbax checkpoint written by vit_jax.train"),
        (str(tmp_path / "run" / "model.npz"), r"model.npz does not fit the model"),
    ):
        config.pretrained = bad
        if bad.endswith(".npz"):
            config.model_overrides = {"hidden_size": 12}
        with pytest.raises(train.TrainingError, match=message):
            train.train_and_evaluate(config, str(tmp_path / "run3"))
        assert not (tmp_path / "run3").exists()
    config.from_scratch = True
    with pytest.raises(train.TrainingError, match=r"^from_scratch=True would ignore pretrained="):
        train.train_and_evaluate(config, str(tmp_path / "run3"))


def test_bad_batch_is_a_clear_error():
    with pytest.raises(
        train.TrainingError,
        match=r"batch 10 is not divisible by accum_steps=4 .*multiple of 4, or an accum_steps "
        r"that divides 10$",
    ):
        train.validate(tiny_config(batch=10, accum_steps=4), 1)
    with pytest.raises(train.TrainingError, match=r"micro-batch 6 .* not divisible by 8 devices"):
        train.validate(tiny_config(batch=12, accum_steps=2), 8)
    with pytest.raises(
        train.TrainingError, match=r"^batch_eval 12 is not divisible by 8 devices; choose a"
    ):
        train.validate(tiny_config(batch=16, accum_steps=2, batch_eval=12), 8)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model": "ViT-X_99"}, "unknown model 'ViT-X_99'; known models: testing"),
        ({"batch": 0}, r"^batch=0 must be >= 1$"),
        ({"batch": -4}, r"^batch=-4 must be >= 1$"),  # checked before divisibility by accum_steps
        ({"batch_eval": 0}, r"^batch_eval=0 must be >= 1$"),
        ({"accum_steps": 0}, r"^accum_steps=0 must be >= 1$"),  # not a ZeroDivisionError
        ({"total_steps": 0}, r"^total_steps=0 must be >= 1$"),
        ({"eval_every": 0}, r"^eval_every=0 must be >= 1$"),
        ({"checkpoint_every": 0}, r"^checkpoint_every=0 must be >= 1$"),
        ({"shuffle_buffer": 0}, r"^shuffle_buffer=0 must be >= 1$"),
        ({"base_lr": -0.1}, r"^base_lr=-0.1 must be >= 0$"),
        ({"warmup_steps": -1}, r"^warmup_steps=-1 must be >= 0$"),
        ({"weight_decay": -1.0}, r"^weight_decay=-1.0 must be >= 0$"),
        ({"grad_norm_clip": -1.0}, r"^grad_norm_clip=-1.0 must be >= 0 \(0 = off\)$"),
        ({"cpu_block_tokens": -1}, r"^cpu_block_tokens=-1 must be >= 0 \(0 turns blocking off\)$"),
        ({"cpu_blocks_at_once": -1}, r"^cpu_blocks_at_once=-1 must be >= 0 \(0 = auto, 1 = one"),
        ({"momentum": 1.0}, r"^momentum=1.0 must be in \[0, 1\)$"),
        ({"crop_area": (0.5, 0.2)}, r"^crop_area=\(0.5, 0.2\): use 0 < min <= max <= 1$"),
        ({"image_size": -8}, r"^image_size=-8: use a positive number of pixels"),
        ({"image_size": 0}, r"^image_size=0: use a positive number of pixels"),
        ({"test_fraction": 1.0}, r"^test_fraction=1.0 must be in \[0, 1\)"),
        ({"attention": "flash"}, r"^attention='flash': use auto, cudnn, xla, einsum$"),
        ({"model": "testing-unpooled"}, r"^classifier='token_unpooled': training needs one output"),
    ],
)
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(train.TrainingError, match=message):
        train.validate(tiny_config(**overrides), 1)


def test_bad_model_settings_stop_before_the_run_directory_exists(tmp_path):
    # Errors the model raises (patch size, an unknown override) arrive as one TrainingError, and
    # nothing is written for a run that never started.
    with pytest.raises(
        train.TrainingError, match=r"^image size 10x10 is not divisible by the patch"
    ):
        train.train_and_evaluate(tiny_config(image_size=10), str(tmp_path / "a"))
    config = tiny_config()
    config.model_overrides = {**config.model_overrides.to_dict(), "heads": 2}
    with pytest.raises(train.TrainingError, match=r"unknown model option\(s\) \['heads'\]"):
        train.train_and_evaluate(config, str(tmp_path / "b"))
    # cuDNN's attention asked for where it cannot run (this CPU): said before anything starts.
    with pytest.raises(
        train.TrainingError,
        match=r"^attention='cudnn' needs an NVIDIA GPU of compute capability 8.0 or newer .* "
        r"use attention='auto' or 'xla'$",
    ):
        train.train_and_evaluate(tiny_config(attention="cudnn"), str(tmp_path / "c"))
    assert os.listdir(tmp_path) == []


def _cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "vit_jax.train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_cli_runs_on_an_image_folder_and_reports_bad_input(tmp_path):
    root = _write_folder(tmp_path / "data")
    common = ["--logdir", str(tmp_path / "runs"), "--total_steps", "2", "--batch", "4"]
    common += ["--accum_steps", "1"]
    commands = {
        "ok": ["--model", "testing", "--dataset", str(root), "--from_scratch", "--image_size", "32",
               "--batch_eval", "4", "--name", "cli", *common],
        "missing_weights": ["--model", "ViT-B_16", "--dataset", str(root), "--vit_pretrained_dir",
                            str(tmp_path), *common],
        "unknown": ["--config", "configs/digits.py", "--config.no_such_key=1", *common],
        "typo": ["--config", "configs/digits.py", "--config.model_overrides.hiden_size=3"],
        "missing_config": ["--config", "configs/nope.py:runlocal"],
        "no_file": ["--config.log_every=0", *common],
        "no_root": ["--config", "configs/image_folder.py"],
        "preset_typo": ["--config", "configs/cifar10.py:ViT-B16"],
        "wrong_type": ["--batch", "abc"],
        "help": ["--help"],
    }  # fmt: skip
    # Side by side: each refusal is mostly the interpreter starting and importing.
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(_cli, *args) for name, args in commands.items()}
    runs = {name: f.result() for name, f in futures.items()}

    ok = runs["ok"]
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "test accuracy" in ok.stdout
    assert os.path.exists(tmp_path / "runs" / "cli" / "model.npz")

    missing = runs["missing_weights"]
    assert missing.returncode == 2
    assert "ViT-B_16.npz not found" in missing.stderr and "gs://vit_models" in missing.stderr
    assert "--from_scratch" in missing.stderr and "Traceback" not in missing.stderr
    assert os.listdir(tmp_path / "runs") == ["cli"]  # the failed start left no run directory

    unknown = runs["unknown"]
    assert unknown.returncode == 2 and unknown.stderr.splitlines() == [
        "error: --config.no_such_key: the config has no field 'no_such_key'. "
        "(train.default_config() lists every field, with its meaning)"
    ]
    typo = runs["typo"]
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert typo.stderr.startswith(
        "error: --config.model_overrides.hiden_size: VisionTransformer has no such attribute; "
        "did you mean hidden_size? (model options: patch_size, hidden_size,"
    )
    missing = runs["missing_config"]
    assert missing.returncode == 2
    assert missing.stderr == "error: no config file configs/nope.py (--config FILE.py[:arg])\n"
    # --config.KEY works without a --config file (it then overrides train.default_config()).
    no_file = runs["no_file"]
    assert no_file.returncode == 2 and no_file.stderr == "error: log_every=0 must be >= 1\n"

    # A config file's own error, and a flag value of the wrong type: one line each, status 2.
    no_root = runs["no_root"]
    assert no_root.returncode == 2 and no_root.stderr.splitlines() == [
        "error: --config configs/image_folder.py: ValueError: give the image folder: "
        "--config configs/image_folder.py:/path/to/ROOT"
    ]
    typo = runs["preset_typo"]
    assert typo.returncode == 2 and len(typo.stderr.splitlines()) == 1
    assert typo.stderr.startswith(
        "error: --config configs/cifar10.py: ValueError: 'ViT-B16' is neither a model nor "
        "'runlocal' (the preset's argument is MODEL[,runlocal]; models: testing, "
    )
    wrong_type = runs["wrong_type"]
    assert wrong_type.returncode == 2 and wrong_type.stderr == (
        "error: flag --batch=abc: invalid literal for int() with base 10: 'abc' "
        "(--helpshort lists the flags)\n"
    )

    for flag in ("--accum_steps", "--vit_pretrained_dir", "--decay_type", "--tfds_manual_dir"):
        assert flag in runs["help"].stdout


def test_a_failing_cudnn_gets_one_line_that_names_the_way_around(tmp_path):
    # What a cuDNN that cannot build the flash-attention graph raises when XLA compiles the step.
    code = textwrap.dedent(
        """
        import sys
        import jax
        from vit_jax import train

        def fail(config, workdir):
            raise jax.errors.JaxRuntimeError(
                "INTERNAL: cuDNN graph could not be built\\nsecond line of the trace"
            )

        train.train_and_evaluate = fail
        train.main(["vit-train", *sys.argv[1:]])
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "--logdir", str(tmp_path), "--name", "a"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        "error: a cuDNN call failed (INTERNAL: cuDNN graph could not be built). If it is the "
        "attention, rerun with --attention xla (a run with checkpoints resumes from the latest)"
    ]


def test_cli_on_mock_cifar10(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        import tensorflow_datasets as tfds
        from vit_jax import train
        with tfds.testing.mock_data(num_examples=20):
            train.main(["vit-train", *sys.argv[1:]])
        """
    )
    args = ["--model", "testing", "--dataset", "cifar10", "--from_scratch", "--image_size", "32",
            "--total_steps", "2", "--batch", "4", "--batch_eval", "8", "--accum_steps", "2",
            "--logdir", str(tmp_path), "--name", "mock",
            # model_overrides starts empty: these are not config fields ml_collections would take
            "--config.model_overrides.dropout_rate=0.2", "--config.model_overrides.hidden_size",
            "12", "--config.model_overrides.patch_size=(8, 8)"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test accuracy" in proc.stdout and "on 20 examples" in proc.stdout
    assert [r["step"] for r in rows(tmp_path / "mock")] == [2]  # log_every=50: the final eval step
    with open(tmp_path / "mock" / "config.json") as f:
        saved = json.load(f)
    assert saved["model_overrides"] == {
        "dropout_rate": 0.2,
        "hidden_size": 12,
        "patch_size": [8, 8],
    }
    assert saved["total_steps"] == 2 and saved["dataset"] == "cifar10"
    params = checkpoint.load(str(tmp_path / "mock" / "model.npz"))
    assert params["embedding"]["kernel"].shape == (8, 8, 3, 12)


@pytest.mark.parametrize(
    "arg, message",
    [
        ("dropout_rate=abc", "dropout_rate=abc: expected a number"),
        ("patch_size=8", "patch_size=8: expected two integers such as '(16, 16)'"),
        ("classifier=unpooled", "classifier=unpooled: expected token or gap"),
        ("representation_size=0", "representation_size=0: expected None or a positive integer"),
        ("num_layers=2.5", "num_layers=2.5: expected a positive integer"),
        ("heads=2", "heads: VisionTransformer has no such attribute; did you mean num_heads?"),
        ("dtype=bfloat16", "dtype: use --dtype (model options:"),
        ("attention=xla", "attention: use --attention (model options:"),
    ],
)
def test_cli_model_overrides_are_checked(arg, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train._model_override_args(["vit-train", "--batch", "8", f"--config.model_overrides.{arg}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: --config.model_overrides.{message}")
    rest, overrides = train._model_override_args(
        ["vit-train", "--batch", "8", "--config.model_overrides.classifier=gap",
         "--config.model_overrides.representation_size", "None"]
    )  # fmt: skip
    assert rest == ["vit-train", "--batch", "8"]
    assert overrides == {"classifier": "gap", "representation_size": None}


def test_a_resumed_run_names_the_settings_that_changed(tmp_path, capsys, monkeypatch):
    assert tiny_config().dtype == "auto"
    train.train_and_evaluate(tiny_config(total_steps=2), str(tmp_path))
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert saved["total_steps"] == 2 and saved["dtype"] == "float32"  # what 'auto' is on CPU
    assert " cpu device(s) in float32 (einsum attention), batch 8 " in capsys.readouterr().out
    config = tiny_config(total_steps=4, base_lr=0.1)
    config.model_overrides.dropout_rate = 0.1
    train.train_and_evaluate(config, str(tmp_path))
    out = capsys.readouterr().out
    assert (
        "settings changed since step 2 (kept in config-2.json): base_lr 0.03 -> 0.1, "
        "model_overrides.dropout_rate (unset) -> 0.1, total_steps 2 -> 4\n"
    ) in out
    with open(tmp_path / "config-2.json") as f:
        assert json.load(f)["total_steps"] == 2
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["total_steps"] == 4
    train.train_and_evaluate(config, str(tmp_path))  # the same settings again: nothing to say
    assert "settings changed" not in capsys.readouterr().out
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("config")) == [
        "config-2.json",
        "config.json",
    ]
    # The run moved to a machine where 'auto' means bfloat16 (a GPU), and takes XLA's fused
    # attention (the way around a failing cuDNN): said, like any change.
    monkeypatch.setattr(models, "default_compute_dtype", lambda *a: jnp.dtype(jnp.bfloat16))
    config.attention, config.total_steps = "xla", 5
    train.train_and_evaluate(config, str(tmp_path))
    out = capsys.readouterr().out
    assert (
        'settings changed since step 4 (kept in config-4.json): attention "auto" -> "xla", '
        'dtype "float32" -> "bfloat16", total_steps 4 -> 5\n'
    ) in out
    assert " device(s) in bfloat16 (xla attention), " in out


def test_run_directory_resumes_the_newest_unfinished_run(tmp_path):
    config = tiny_config()
    config.model = "ViT-B_16"
    assert train.run_directory(str(tmp_path), "mine", config) == str(tmp_path / "mine")
    fresh = train.run_directory(str(tmp_path), None, config)
    assert os.path.basename(fresh).startswith("ViT-B_16-digits-")
    for name, finished in (
        ("ViT-B_16-digits-20260101-000000", True),
        ("ViT-B_16-digits-20260102-000000", False),
    ):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        if finished:
            (tmp_path / name / "eval.json").write_text("{}")
    assert train.run_directory(str(tmp_path), None, config) == str(
        tmp_path / "ViT-B_16-digits-20260102-000000"
    )


def scripted_evaluation(monkeypatch, key, values):
    """Makes each evaluation report the next of `values` as `key` (the real evaluation still runs)."""
    real, values = train.evaluate, list(values)

    def scripted(*args, **kwargs):
        result = real(*args, **kwargs)
        if values:
            result[key] = values.pop(0)
        return result

    monkeypatch.setattr(train, "evaluate", scripted)
    return values


@pytest.mark.parametrize(
    "metric,key,values,best_step",
    [
        ("accuracy", "accuracy", [0.2, 0.6, 0.4, 0.5, 0.3], 4),
        ("loss", "test_loss", [1.0, 0.5, 0.7, 0.4, 0.9], 8),
    ],
)
def test_keep_best_keeps_the_best_evaluated_step(
    tmp_path, monkeypatch, metric, key, values, best_step
):
    config = tiny_config(total_steps=10, eval_every=2, checkpoint_every=2, keep_checkpoints=10)
    config.keep_best = metric
    scripted_evaluation(monkeypatch, key, values)
    result = train.train_and_evaluate(config, str(tmp_path))
    expected = {"step": best_step, "metric": metric, "value": values[best_step // 2 - 1]}
    assert result["best"] == expected and result["step"] == 10 and not result["stopped_early"]
    with open(tmp_path / "eval.json") as f:
        assert json.load(f)["best"] == expected
    assert os.listdir(tmp_path / "best") == [str(best_step)]
    best = checkpoint.load(str(tmp_path / "best.npz"))
    at_best = checkpoint.load_orbax_params(str(tmp_path / "checkpoints" / str(best_step)))
    jax.tree.map(np.testing.assert_array_equal, best, at_best)
    jax.tree.map(
        np.testing.assert_array_equal, best, checkpoint.load_orbax_params(str(tmp_path / "best"))
    )
    last = checkpoint.load(str(tmp_path / "model.npz"))
    assert not np.array_equal(last["head"]["kernel"], best["head"]["kernel"])


def test_early_stopping_stops_at_the_expected_evaluation_and_stays_stopped(tmp_path, monkeypatch):
    config = tiny_config(total_steps=20, eval_every=2, checkpoint_every=5, keep_checkpoints=10)
    config.early_stop_patience = 2
    # Evaluations at steps 2, 4, 6, 8: best at 4, then two without improvement -> stop at 8.
    scripted_evaluation(monkeypatch, "accuracy", [0.2, 0.6, 0.5, 0.55, 0.9, 0.95])
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 8 and result["stopped_early"]
    assert "best" not in result  # kept only with --keep_best
    assert rows(tmp_path)[-1]["step"] == 8
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [5, 8]  # saved first
    # Rerunning the stopped run trains nothing more.
    again = train.train_and_evaluate(config, str(tmp_path))
    assert again["step"] == 8 and again["stopped_early"]
    assert rows(tmp_path)[-1]["step"] == 8


def test_early_stopping_count_survives_a_resume(tmp_path, monkeypatch):
    config = tiny_config(total_steps=20, eval_every=2, checkpoint_every=4, keep_checkpoints=10)
    config.early_stop_patience, config.keep_best = 2, "accuracy"
    # Evaluations at 2 and 4 (best at 4, checkpointed with the count), killed at step 6.
    scripted_evaluation(monkeypatch, "accuracy", [0.3, 0.6])
    real = kill_after_5_batches(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, str(tmp_path))
    monkeypatch.setattr(input_pipeline, "train_batches", real)
    # Resumed from step 4: evaluations at 6 and 8 do not improve -> stop at 8, best still 4.
    scripted_evaluation(monkeypatch, "accuracy", [0.5, 0.4])
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 8 and result["stopped_early"]
    assert result["best"] == {"step": 4, "metric": "accuracy", "value": 0.6}
    assert os.listdir(tmp_path / "best") == ["4"]


def test_keep_best_and_patience_flags_are_checked():
    with pytest.raises(train.TrainingError, match="keep_best='acc': use accuracy or loss"):
        train.validate(tiny_config(keep_best="acc"), 1)
    with pytest.raises(train.TrainingError, match="early_stop_patience=-1 must be >= 0"):
        train.validate(tiny_config(early_stop_patience=-1), 1)


def test_home_paths_are_expanded_where_the_shell_does_not(tmp_path, monkeypatch):
    # `--dataset=~/data` reaches the program with its '~' (the shell expands only a word's start).
    monkeypatch.setenv("HOME", str(tmp_path))
    _write_folder(tmp_path / "data")
    config = tiny_config("~/data")
    assert train.run_directory("~/runs", "r", config) == str(tmp_path / "runs" / "r")
    train.train_and_evaluate(config, "~/runs/r")
    assert (tmp_path / "runs" / "r" / "model.npz").exists() and config.dataset == "~/data"
    env = {**os.environ, "HOME": str(tmp_path)}
    commands = [
        ["vit_jax.checkpoint", "convert", "~/runs/r", "~/copy.npz"],
        ["vit_jax.predict", "--workdir=~/runs/r", "--json", "~/data/test/red/0.png"],
    ]
    for command in commands:
        proc = subprocess.run(
            [sys.executable, "-m", *command], capture_output=True, text=True, env=env, timeout=300
        )
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "copy.npz").exists()
    result = json.loads(proc.stdout)["results"][0]
    assert result["file"] == str(tmp_path / "data" / "test" / "red" / "0.png")


def test_ctrl_c_while_the_command_imports_is_one_line(tmp_path):
    # jax and TensorFlow take seconds to import: Ctrl-C then gets one line and status 130, no
    # import traceback (and no crash in the interpreter's teardown).
    args = [
        "--dataset",
        "digits",
        "--model",
        "testing",
        "--from_scratch",
        "--logdir",
        str(tmp_path),
    ]
    # Ctrl-C's default disposition, as in a terminal (a background job's may be "ignored"), set
    # by a launcher that then execs the command (a preexec_fn would fork this threaded process).
    launcher = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.executable, [sys.executable, '-m', 'vit_jax.train', *sys.argv[1:]])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted")


def test_ctrl_c_says_which_checkpoint_a_rerun_resumes_from(tmp_path):
    args = ["--dataset", "digits", "--model", "testing", "--from_scratch", "--image_size", "16"]
    args += ["--batch", "16", "--accum_steps", "1", "--total_steps", "10000000"]
    args += ["--checkpoint_every", "20", "--eval_every", "10000000"]
    args += ["--logdir", str(tmp_path), "--name", "r", "--config.progress=False"]
    # A background job's SIGINT may be ignored, and that is inherited: give it Ctrl-C's default.
    launcher = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        f"sys.argv = ['vit_jax.train', *{args!r}]; runpy.run_module('vit_jax.train', run_name='__main__')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    checkpoints = tmp_path / "r" / "checkpoints"
    deadline = time.monotonic() + 240
    while not checkpoint.saved_steps(str(checkpoints)) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    step = int(re.match(r"interrupted; the latest checkpoint is step (\d+) in ", last).group(1))
    assert step == checkpoint.saved_steps(str(checkpoints))[-1] and step % 20 == 0
    assert not [p.name for p in checkpoints.iterdir() if "tmp" in p.name]  # no save cut short
    assert last.endswith(
        "Rerun the same command to resume from it (the steps after it are trained again)"
    )
