"""vit_jax.evaluate: a checkpoint's test accuracy on a labelled dataset, with its own head."""

import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tests.test_train import CIFAR10_NAMES, _fake_cifar10_archive, tiny_config
from vit_jax import checkpoint, evaluate, input_pipeline, models, predict, train


def _evaluate(capsys, *args):
    evaluate.main([*args, "--json"])
    return json.loads(capsys.readouterr().out)


def _checkpoint(path, size):
    """A 10-class `testing` ViT for `size` px images, saved in the published layout."""
    model = models.get_model("testing", num_classes=10)
    params = model.init(jax.random.key(0), np.zeros((1, size, size, 3)), train=False)["params"]
    return checkpoint.save(params, str(path))


def _folder(root, classes):
    for split in ("train", "test"):
        for i, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            level = 20 * i + (split == "test")  # test images are not copies of training ones
            Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(root / split / name / "0.png")
    return root


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_run_is_scored_as_it_scored_itself(tmp_path, capsys, dtype):
    run = tmp_path / "run"
    result = train.train_and_evaluate(tiny_config("digits", dtype=dtype), str(run))
    capsys.readouterr()
    # The run directory alone: its model.npz, dataset (config.json) and class names (labels.txt).
    out = _evaluate(capsys, "--workdir", str(run), "--batch", "24")
    assert out["dataset"] == "digits" and out["class_names"] == [str(i) for i in range(10)]
    assert out["num_examples"] == result["num_examples"] == 360
    assert out["accuracy"] == result["accuracy"]
    assert out["confusion_matrix"] == result["confusion_matrix"]
    assert out["test_loss"] == pytest.approx(result["test_loss"], rel=1e-5)
    # In the other dtype: other rounding, another loss.
    other = {"float32": "bfloat16", "bfloat16": "float32"}[dtype]
    out = _evaluate(capsys, "--workdir", str(run), "--dtype", other)
    assert out["test_loss"] != result["test_loss"]
    assert out["test_loss"] == pytest.approx(result["test_loss"], rel=0.05)
    # The exported file alone (not a run directory) with the dataset named: float32.
    out = _evaluate(capsys, "--checkpoint", str(run / "model.npz"), "--dataset", "digits")
    float32 = _evaluate(capsys, "--workdir", str(run), "--dtype", "float32")
    assert out == {**float32, "dataset": "digits"} and out["num_examples"] == 360
    # Text: the table a training run ends with.
    evaluate.main(["--workdir", str(run)])
    text = capsys.readouterr().out
    assert text == train.format_report(result, [str(i) for i in range(10)]) + "\n"


def test_mock_tfds_split_is_counted_once_per_example(tmp_path, capsys):
    path = _checkpoint(tmp_path / "m.npz", 32)
    with tfds.testing.mock_data(num_examples=37):
        out = _evaluate(capsys, "--checkpoint", str(path), "--dataset", "cifar10", "--batch", "16")
    assert out["num_examples"] == 37 and sum(out["support"]) == 37  # 16 + 16 + 5, none dropped
    assert np.sum(out["confusion_matrix"]) == 37


def test_only_a_runs_own_train_split_is_refused(tmp_path, capsys, monkeypatch):
    # TFDS's real download_and_prepare of a small CIFAR-10 (10 train, 6 test examples).
    archive = _fake_cifar10_archive(tmp_path / "extracted")
    monkeypatch.setattr(
        tfds.download.DownloadManager, "download_and_extract", lambda self, url: str(archive)
    )
    monkeypatch.setattr(input_pipeline, "unreachable", lambda urls: None)  # (no network here)
    data = ["--dataset", "cifar10", "--tfds_data_dir", str(tmp_path / "tfds"), "--batch", "4"]
    # A published checkpoint never saw our train split: it may be scored on it. (stdout holds the
    # JSON alone: TFDS's "Downloading and preparing dataset ..." went to stderr.)
    path = _checkpoint(tmp_path / "m.npz", 32)
    out = _evaluate(capsys, "--checkpoint", str(path), *data, "--split", "train")
    assert out["num_examples"] == 10 and out["class_names"] == CIFAR10_NAMES
    # A run that trained on the first half of it.
    run = tmp_path / "run"
    run.mkdir()
    _checkpoint(run / "model.npz", 32)
    (run / "labels.txt").write_text("".join(f"{c}\n" for c in CIFAR10_NAMES))
    recorded = {"dataset": "cifar10", "tfds_data_dir": str(tmp_path / "tfds")}
    (run / "config.json").write_text(json.dumps({**recorded, "train_split": "train[:50%]"}))
    with pytest.raises(SystemExit):
        evaluate.main(["--workdir", str(run), "--split", "train[30%:]"])
    assert capsys.readouterr().err.strip() == (
        "error: the split 'train[30%:]' shares 2 examples with 'train[:50%]', the split of "
        "cifar10 the run trained on, so the accuracy would count images it trained on: choose a "
        "--split disjoint from it (left unset, it is the run's own test split)"
    )
    # From Python the message names the config field that `data_config` takes.
    config = evaluate.data_config(
        evaluate.run_settings(str(run)), (32, 32), test_split="train[30%:]"
    )
    with pytest.raises(evaluate.EvaluationError, match=r"choose a --config\.test_split disjoint"):
        evaluate.dataset_info(config, 10)
    assert _evaluate(capsys, "--workdir", str(run), "--split", "train[50%:]")["num_examples"] == 5
    assert _evaluate(capsys, "--workdir", str(run))["num_examples"] == 6  # its test split
    # The same split of the same file, named as another dataset's run: scored.
    (run / "config.json").write_text(json.dumps({**recorded, "dataset": "digits"}))
    out = _evaluate(capsys, "--workdir", str(run), *data, "--split", "train[30%:]")
    assert out["num_examples"] == 7


def test_classes_that_do_not_fit_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "labels.txt").write_text("".join(f"{c}\n" for c in "abcdefghij"))
    _checkpoint(run / "model.npz", 16)

    def error(*args):
        with pytest.raises(SystemExit) as e:
            evaluate.main(list(args))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err.strip().splitlines()[-1]

    # Another number of classes: refused before the folder's images are decoded or TFDS downloads.
    two = _folder(tmp_path / "two", ["cat", "dog"])
    assert error("--workdir", str(run), "--dataset", str(two)) == (
        "error: the checkpoint's head has 10 classes and two has 2: evaluate a checkpoint "
        "fine-tuned on this dataset (an ImageNet-21k one has 21843 classes, a published ImageNet "
        "one 1000, for imagenet2012)"
    )
    assert error("--workdir", str(run), "--dataset", "cifar100").startswith(
        "error: the checkpoint's head has 10 classes and cifar100 has 100"
    )
    # As many classes, but others: the run's labels.txt against the folder's (sorted) classes.
    other_names = _folder(tmp_path / "ten", list("abcdefghik"))
    assert error("--workdir", str(run), "--dataset", str(other_names)) == (
        "error: the run's classes are not ten's, in the same order (1 of 10 names differ, e.g. class 9: "
        "'j' in the run, 'k' in the dataset); its predictions would be scored against the wrong "
        "labels"
    )
    (run / "config.json").write_text(json.dumps({"dataset": str(other_names)}))
    (run / "labels.txt").rename(run / "saved_labels.txt")  # a run without class names: not checked
    assert _evaluate(capsys, "--workdir", str(run))["class_names"] == list("abcdefghik")
    (run / "saved_labels.txt").rename(run / "labels.txt")
    same = _folder(tmp_path / "same", list("abcdefghij"))
    out = _evaluate(capsys, "--workdir", str(run), "--dataset", str(same))
    assert out["num_examples"] == 10 and out["class_names"] == list("abcdefghij")
    (run / "labels.txt").write_text("".join(f"{c}\n" for c in "abcdefghi"))  # one name short
    assert error("--workdir", str(run), "--dataset", str(same)) == (
        "error: the run recorded 9 class names for 10 classes"
    )
    assert error("--workdir", str(run), "--dataset", str(same), "--split", "validation") == (
        "error: --split picks a TFDS split; an image folder's test split is its test/ (or val/, "
        "validation/) folder, or the whole folder when it has no train/"
    )
    assert error("--workdir", str(run), "--test_fraction", "1").endswith(
        "error: argument --test_fraction: 1.0 is not in [0, 1)"
    )
    (run / "config.json").write_text("{not json")
    assert error("--workdir", str(run)).startswith(
        f"error: {run / 'config.json'} is not the JSON a run writes (Expecting property name"
    )
    # A file outside a run brings no dataset.
    other = tmp_path / "m.npz"
    other.write_bytes((run / "model.npz").read_bytes())
    assert error("--checkpoint", str(other)).endswith(
        "error: give --dataset (a run directory's checkpoint brings its own)"
    )


def test_a_folder_of_new_images_is_scored_whole(tmp_path, capsys):
    # A run trained on `trained` (train/ and test/) with ten classes; a new folder without train/
    # holds images of two of them, a copy of a training image and a file that is not an image.
    classes = list("abcdefghij")
    run = tmp_path / "run"
    run.mkdir()
    (run / "labels.txt").write_text("".join(f"{c}\n" for c in classes))
    trained = _folder(tmp_path / "trained", classes)
    (run / "config.json").write_text(json.dumps({"dataset": str(trained)}))
    model, params = checkpoint.load_pretrained_model(None, str(_checkpoint(run / "model.npz", 16)))
    new = tmp_path / "new"
    rng = np.random.default_rng(0)
    for name, count in (("c", 4), ("h", 3)):
        (new / name).mkdir(parents=True)
        for i in range(count):  # at the model's 16 px: both pipelines read the same pixels
            pixels = rng.integers(0, 256, (16, 16, 3), np.uint8)
            Image.fromarray(pixels).save(new / name / f"{i}.png")
    (new / "c" / "copy.png").write_bytes((trained / "train" / "c" / "0.png").read_bytes())
    (new / "h" / "notes.png").write_text("not an image")

    with pytest.raises(SystemExit) as e:
        evaluate.main(["--workdir", str(run), "--dataset", str(new)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"error: unreadable image {new / 'h' / 'notes.png'}")
    )
    assert err.strip().endswith("or pass --skip_bad_images to skip such files")

    evaluate.main(["--workdir", str(run), "--dataset", str(new), "--skip_bad_images", "--json"])
    out, err = capsys.readouterr()
    out = json.loads(out)
    notes = err.strip().splitlines()
    assert notes[0] == f"scoring all of {new}: 7 images in 2 of the model's 10 classes"
    assert notes[1].startswith(
        "test: left out 1 image(s) that are byte-for-byte copies of training"
    )
    assert notes[-1].startswith("test: skipped 1 unreadable image(s) (--skip_bad_images), e.g.")
    # Labels by folder name (c is class 2, h class 7); predictions as vit_jax.predict makes them.
    assert out["num_examples"] == 7 and out["support"] == [0, 0, 4, 0, 0, 0, 0, 3, 0, 0]
    files = [str(new / "c" / f"{i}.png") for i in range(4)] + [
        str(new / "h" / f"{i}.png") for i in range(3)
    ]
    results, _ = predict.predict(model, params, files, classes, top_k=1)
    predicted = [r["predictions"][0]["index"] for r in results]
    expected = np.zeros((10, 10), int)
    for true, guess in zip([2] * 4 + [7] * 3, predicted, strict=True):
        expected[true, guess] += 1
    assert out["confusion_matrix"] == expected.tolist()
    assert out["accuracy"] == pytest.approx(np.trace(expected) / 7)

    # The run's own dataset keeps training's test split (test/, one image per class).
    own = _evaluate(capsys, "--workdir", str(run), "--dataset", str(trained))
    assert own["num_examples"] == 10
    # The same images under new/test/: scored whole too; a folder the model lacks is refused.
    (tmp_path / "again").mkdir()
    (new).rename(tmp_path / "again" / "test")
    (tmp_path / "again" / "test" / "h" / "notes.png").unlink()
    trained.rename(tmp_path / "moved")  # the run's data gone: copies cannot be looked for
    evaluate.main(["--workdir", str(run), "--dataset", str(tmp_path / "again"), "--json"])
    again, err = capsys.readouterr()
    assert f"not compared with the run's training images: {trained} is gone" in err
    again = json.loads(again)
    assert again["num_examples"] == 8 and again["support"] == [0, 0, 5, 0, 0, 0, 0, 3, 0, 0]
    copy = str(tmp_path / "again" / "test" / "c" / "copy.png")
    (result,), _ = predict.predict(model, params, [copy], classes)
    expected[2, result["predictions"][0]["index"]] += 1
    assert again["confusion_matrix"] == expected.tolist()
    (tmp_path / "again" / "test" / "zebra").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
        tmp_path / "again" / "test" / "zebra" / "0.png"
    )
    with pytest.raises(SystemExit):
        evaluate.main(["--workdir", str(run), "--dataset", str(tmp_path / "again")])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'again' / 'test'} has class folders that are not among the model's "
        "10 classes: zebra (the model's: a, b, c, d, e, f, g, h, ...); the model cannot predict "
        "them, so rename or remove those folders"
    )
    # Without the run's class names, the sorted folders are the head's classes: ten are needed.
    alone = tmp_path / "alone.npz"
    alone.write_bytes((run / "model.npz").read_bytes())
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(alone), "--dataset", str(tmp_path / "again")])
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith(
            f"error: {tmp_path / 'again' / 'test'} has 3 class folders with images and the model 10 "
            "classes: without the model's class names"
        )
    )


def test_out_of_memory_is_one_line_that_names_the_batch(tmp_path, capsys, monkeypatch):
    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 30 bytes.")

    monkeypatch.setattr(evaluate, "evaluate_checkpoint", exhausted)
    ckpt = _checkpoint(tmp_path / "m.npz", 16)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(ckpt), "--dataset", "digits", "--batch", "8"])
    assert e.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith(
            "error: out of memory evaluating batches of 8 images (RESOURCE_EXHAUSTED: Out of memory "
            "allocating 30 bytes.); a cpu device has "
        )
    )
