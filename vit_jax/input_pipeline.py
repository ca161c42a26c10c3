"""Datasets -> batches of images in [-1, 1] and integer labels (tf.data).

Three sources, chosen by the `dataset` string of the config:
- any TFDS image-classification dataset by name (`cifar10`, `imagenet2012`, `oxford_iiit_pet`, ...);
- an image folder `ROOT/{train,test}/<class>/<file>` (pass `ROOT` as the dataset; `val/` or
  `validation/` may stand for `test/`), or `ROOT/<class>/<file>` with a held-out `test_fraction`;
- `digits`: scikit-learn's embedded 8x8 handwritten digits (1797 images), so the job runs offline.

Preprocessing follows the reference: train = random crop of 5-100 % of the area (aspect 3/4-4/3) ->
resize -> random horizontal flip; eval = resize; pixels scaled to [-1, 1]; grayscale and RGBA become RGB.

The training stream is a pure function of (seed, position): a seeded shuffle, then every example's
augmentation drawn from stateless random ops keyed on (seed, example index). `train_batches(...,
start_step=s)` therefore continues exactly where a run stopped at step s, and each process of a
multi-host run reads its own shard.
"""

from __future__ import annotations

import dataclasses
import filecmp
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from vit_jax.commands import atomic_path, cache_dir, first_line, is_run_directory
from vit_jax.models import image_hw

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# An image folder's test split: the first of these under ROOT (next to ROOT/train).
TEST_DIRS = ("test", "val", "validation")
# What tf.io.decode_image reads, as PIL names the formats (MPO: a camera's multi-picture JPEG).
TF_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP")

# (train split, test split) where the default "train"/"test" is not what the reference uses.
TFDS_SPLITS = {
    "cifar10": ("train[:98%]", "test"),
    "cifar100": ("train[:98%]", "test"),
    "imagenet2012": ("train[:99%]", "validation"),
    "oxford_iiit_pet": ("train[:90%]", "test"),
    "oxford_flowers102": ("train", "test"),
}


class DataError(ValueError):
    """A dataset that cannot be read; the message names the file or setting to fix."""


class SharedSplitsError(DataError):
    """A test split that shares `shared` examples with the train split (TFDS split specs)."""

    def __init__(self, message: str, train_split: str, test_split: str, shared: int):
        super().__init__(message)
        self.train_split, self.test_split, self.shared = train_split, test_split, shared


@dataclasses.dataclass
class DatasetInfo:
    """What the model and the evaluation need to know about a dataset."""

    name: str
    num_classes: int
    class_names: list[str]
    source: str  # 'tfds', 'folder' or 'digits'
    # An image folder's checked files per split ('train_scan': a FolderSplit), kept for the run.
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


def _tf():
    import tensorflow as tf

    if not getattr(_tf, "configured", False):
        # tf.data only runs on the host: keep TensorFlow off the GPU that JAX uses.
        tf.config.set_visible_devices([], "GPU")
        _tf.configured = True
    return tf


def parallel_calls() -> int:
    """Threads of a pipeline's parallel map: the CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def numpy_iterator(ds: Any) -> Iterator:
    """`ds.as_numpy_iterator()`, with tf.data's model-based autotuning off.

    Deleting an iterator (at the end of a run, of an evaluation, of a folder scan) waits for the
    thread that the autotuner runs at intervals growing to 60 s: in 3 of 6 timed digits demos
    the run's end waited 20-51 s in `RootDataset::Iterator`'s destructor for it (a native
    stack), on a loaded CPU. The maps run `parallel_calls()` threads instead of an autotuned
    number (input at 384 px on 2 cores: 602-607 img/s against 619-650 autotuned), and
    `prefetch(AUTOTUNE)` still sizes its buffer by itself.
    """
    tf = _tf()
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options).as_numpy_iterator()


def _splits(config: Any) -> tuple[str, str]:
    default = TFDS_SPLITS.get(config.dataset, ("train", "test"))
    return config.train_split or default[0], config.test_split or default[1]


# ----------------------------------------------------------------------------- sources


def folder_dirs(root: str) -> tuple[str, str | None]:
    """(train directory, test directory) of an image folder: ROOT/train and the first of
    ROOT/{test,val,validation}; without ROOT/train, ROOT itself (ROOT/<class>/) and None. A None
    test directory means the test split is held out of the train images (`test_fraction`)."""
    train = os.path.join(root, "train")
    if not os.path.isdir(train):
        return root, None
    return train, _test_dir(root)


def _test_dir(root: str) -> str | None:
    """The first of ROOT/{test,val,validation} that exists, or None."""
    return next(
        (os.path.join(root, d) for d in TEST_DIRS if os.path.isdir(os.path.join(root, d))), None
    )


def _held_out(paths: list[str], directory: str, fraction: float) -> set[str]:
    """The images of one class folder that form its share of a held-out test split: those whose
    path in the folder hashes into the lowest `fraction` of the hash range, so that an image's
    split depends on its own name only. The same files in every run and on every process,
    whatever the seed, and adding images to a class moves none of its earlier ones to the other
    split (a rank cut-off would: files trained on before would be scored as unseen). About
    `fraction` of each class, not exactly; with 2 or more images at least one on each side (the
    lowest, or the highest, hash)."""
    if len(paths) < 2:
        return set()

    def key(path: str) -> float:
        digest = hashlib.sha256(os.path.relpath(path, directory).encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    keys = {path: key(path) for path in paths}
    test = {path for path in paths if keys[path] < fraction}
    if not test:
        test = {min(paths, key=keys.__getitem__)}
    elif len(test) == len(paths):
        test.remove(max(paths, key=keys.__getitem__))
    return test


class FolderSplit(NamedTuple):
    """The checked images of one split of an image folder."""

    files: list[str]  # the images training reads, in a fixed order
    labels: np.ndarray  # (len(files),) int64 class indices
    bad: list[tuple[str, str]]  # (path, reason) of the images the decoder cannot read
    ignored: list[str]  # files whose extension is not an image's
    fingerprints: np.ndarray  # (len(files),) int64 hashes of the files' bytes
    cached: int = 0  # images whose decode check came from the scan cache (`_checked_by_decoder`)
    runs: tuple[str, ...] = ()  # run directories found among the images, left out


def _folder_files(
    root: str,
    split: str,
    class_names: list[str],
    skip_bad: bool,
    test_fraction: float = 0.0,
    *,
    split_dir: str | None = None,
) -> FolderSplit:
    """The images of an image folder's 'train' or 'test' split (see `folder_dirs`; without a test
    directory, about `test_fraction` of each class is the test split), or with `split_dir` all the
    images of the class folders in that directory: images training cannot decode are skipped with
    `skip_bad`, else a DataError. An image's label is its class folder's index in `class_names`;
    a name without a folder has no images.

    Every image is decoded once here, by the decoder training uses: a file that fails would
    otherwise stop the run whenever the shuffle reaches it (PIL's checks pass truncated JPEGs).
    """
    from PIL import Image, UnidentifiedImageError

    if split_dir is None:
        train_dir, test_dir = folder_dirs(root)
        split_dir = test_dir if split == "test" and test_dir else train_dir
        held_out = test_dir is None and test_fraction > 0
    else:
        train_dir, held_out = split_dir, False
    candidates, bad, ignored, position, runs = [], {}, [], {}, []
    for label, cls in enumerate(class_names):
        directory = os.path.join(split_dir, cls)
        if not os.path.isdir(directory):
            continue
        found_runs: list[str] = []
        paths = list(_visible_files(directory, found_runs))
        images = [path for path in paths if path.lower().endswith(IMAGE_EXTENSIONS)]
        if not held_out or split == "train":  # (a held-out split's are the train split's)
            ignored += [path for path in paths if not path.lower().endswith(IMAGE_EXTENSIONS)]
            runs += found_runs
        if held_out:
            test = _held_out(images, directory, test_fraction)
            images = [path for path in images if (path in test) == (split == "test")]
        for path in images:
            position[path] = len(position)
            try:
                with Image.open(path) as im:  # reads the header only
                    reason = _not_decodable(im.format, im.mode)
            except Image.DecompressionBombError:  # PIL's size limit; TensorFlow's decode decides
                reason = None
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                reason = f"{type(e).__name__}: {e}"
            if reason is None:
                candidates.append((path, label))
            else:
                bad[path] = reason
    failures, fingerprints, cached = _checked_by_decoder(
        [path for path, _ in candidates], split_dir
    )
    bad.update(failures)
    bad_list = sorted(bad.items(), key=lambda item: position[item[0]])
    if bad_list and not skip_bad:
        path, reason = bad_list[0]
        more = f" and {len(bad_list) - 1} more" if len(bad_list) > 1 else ""
        raise DataError(
            f"unreadable image {path} ({reason}){more}; remove or replace it (PNG or JPEG "
            "always work), or pass --config.skip_bad_images=True to skip such files"
        )
    kept = [(path, label) for path, label in candidates if path not in bad]
    if not kept and bad_list:
        path, reason = bad_list[0]
        raise DataError(
            f"no readable images in {split_dir} ({split}): all {len(bad_list)} were "
            f"skipped as unreadable, e.g. {path} ({reason})"
        )
    if not kept and held_out and split == "test":
        raise DataError(
            f"no images in the held-out test split of {train_dir}: a class folder gives it an "
            "image only when it holds 2 or more, and none does; add images, or put test images "
            "in ROOT/test/<class>/"
        )
    if not kept:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {split_dir}")
    files = [path for path, _ in kept]
    return FolderSplit(
        files,
        np.asarray([label for _, label in kept], np.int64),
        bad_list,
        ignored,
        np.asarray([fingerprints[path] for path in files], np.int64),
        cached,
        tuple(runs),
    )


# The scan cache's format; a cache written by another format or TensorFlow version is not used.
SCAN_CACHE_FORMAT = 1


def _scan_cache_path(directory: str) -> str:
    digest = hashlib.sha256(os.path.realpath(directory).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), "scans", f"{digest}.json")


def _checked_by_decoder(
    paths: list[str], directory: str
) -> tuple[dict[str, str], dict[str, int], int]:
    """`_tf_decode(paths)` (files under `directory`) and how many of them the scan cache answered.

    Decoding every image is most of a scan's time (1.5 ms a 500x375 JPEG on one core), and it is
    the same at every start of a run on the same folder. The answers are kept in
    $VIT_JAX_CACHE/scans/ (a JSON file per folder: each file's size, modification time, and
    fingerprint or error); a file whose size or modification time has changed is decoded again.
    A cache that cannot be read or written is ignored.
    """
    tf_version = _tf().__version__
    cache_path = _scan_cache_path(directory)
    try:
        with open(cache_path) as f:
            cache = json.load(f)
        same = (cache.get("format"), cache.get("tensorflow")) == (SCAN_CACHE_FORMAT, tf_version)
        entries = cache["files"] if same and isinstance(cache["files"], dict) else {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        entries = {}
    failures, fingerprints, todo, now = {}, {}, [], {}
    relatives = [os.path.relpath(path, directory) for path in paths]
    for path, relative in zip(paths, relatives, strict=True):
        stat = os.stat(path)
        entry = [stat.st_size, stat.st_mtime_ns]
        known = entries.get(relative)
        if isinstance(known, list) and len(known) == 4 and known[:2] == entry:
            fingerprint, reason = known[2:]
            if isinstance(reason, str):
                failures[path] = reason
            elif isinstance(fingerprint, int):
                fingerprints[path] = fingerprint
            else:
                todo.append(path)
        else:
            todo.append(path)
        now[relative] = entry
    new_failures, new_fingerprints = _tf_decode(todo)
    failures.update(new_failures)
    fingerprints.update(new_fingerprints)
    if todo:
        for path, relative in zip(paths, relatives, strict=True):
            now[relative] += [fingerprints.get(path), failures.get(path)]
        # Entries of files this scan did not look at (the other part of a held-out split).
        kept = {
            relative: entry
            for relative, entry in entries.items()
            if relative not in now and os.path.exists(os.path.join(directory, relative))
        }
        try:
            with atomic_path(cache_path) as tmp, open(tmp, "w") as f:
                json.dump(
                    {
                        "format": SCAN_CACHE_FORMAT,
                        "tensorflow": tf_version,
                        "directory": os.path.realpath(directory),
                        "files": {**kept, **now},
                    },
                    f,
                )
        except OSError:
            pass
    return failures, fingerprints, len(paths) - len(todo)


def _tf_decode(paths: list[str]) -> tuple[dict[str, str], dict[str, int]]:
    """({path: TensorFlow's error} for the files tf.io.decode_image cannot decode, {path: 64-bit
    fingerprint of the file's bytes} for the others), found by decoding all of them in parallel
    (tf.data drops the failures; only those are decoded again, one by one, for their messages)."""
    tf = _tf()
    if not paths:
        return {}, {}

    def decode(index, path):  # the training pipeline's decoder
        data = tf.io.read_file(path)
        height = tf.shape(_decode(data, encoded=True))[0]
        return index, height, tf.strings.to_hash_bucket_fast(data, 2**63 - 1)  # FarmHash64

    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
    ds = ds.map(decode, num_parallel_calls=parallel_calls(), deterministic=False).ignore_errors()
    fingerprints = {paths[index]: int(hashed) for index, _, hashed in numpy_iterator(ds)}
    failures = {}
    for index in (i for i, path in enumerate(paths) if path not in fingerprints):
        try:
            decode(index, paths[index])
            reason = "TensorFlow could not decode it"  # failed in tf.data only
        except tf.errors.OpError as e:
            reason = f"TensorFlow cannot decode it: {_tf_message(e)}"
        failures[paths[index]] = reason
    return failures, fingerprints


def _not_decodable(image_format: str | None, mode: str) -> str | None:
    """Why TensorFlow's decoder, which training uses, cannot read an image PIL reads; None if it
    can. (Found up front: a decode error in tf.data would stop the run whenever the file comes.)"""
    if image_format not in TF_FORMATS:
        return f"a {image_format} file, which TensorFlow does not decode"
    if image_format == "BMP" and mode == "1":
        return "a 1-bit BMP, which TensorFlow does not decode"
    if image_format == "BMP" and mode == "P":
        return "a palette BMP, whose colours TensorFlow decodes as grey levels"
    if image_format == "WEBP" and not hasattr(_tf().io, "decode_webp"):
        return "a WebP file, which this TensorFlow version does not decode"
    return None


def _scan(config: Any, info: DatasetInfo, split: str) -> FolderSplit:
    """`_folder_files` of an image folder's split, once per DatasetInfo (so once a run); the test
    split without the images that are copies of training images (`_without_copies`)."""
    if f"{split}_scan" not in info.details:
        scan = _folder_files(
            config.dataset, split, info.class_names, config.skip_bad_images, config.test_fraction
        )
        if split == "test":
            scan = _without_copies(scan, _scan(config, info, "train"), info)
        info.details[f"{split}_scan"] = scan
    return info.details[f"{split}_scan"]


def _without_copies(test: FolderSplit, train: FolderSplit, info: DatasetInfo) -> FolderSplit:
    """`test` without its images whose bytes equal a training image's (an image saved in both
    folders, test/ linked to train/, a file copied twice into a class before the hold-out): the
    model would have trained on them. The (test, train) pairs go to info.details['test_copies']."""
    twins = dict(zip(train.fingerprints.tolist(), train.files, strict=True))
    copies, keep = [], []
    for path, fingerprint in zip(test.files, test.fingerprints.tolist(), strict=True):
        twin = twins.get(fingerprint)
        is_copy = twin is not None and filecmp.cmp(path, twin, shallow=False)
        keep.append(not is_copy)
        if is_copy:
            copies.append((path, twin))
    info.details["test_copies"] = copies
    if not copies:
        return test
    if not any(keep):
        raise DataError(
            f"every one of the {len(copies)} test images is a copy of a training image (e.g. "
            f"{copies[0][0]} of {copies[0][1]}), so the test accuracy would only count images "
            "the model trained on: put images in the test split that training does not see"
        )
    keep = np.asarray(keep)
    files = [path for path, kept in zip(test.files, keep, strict=True) if kept]
    return test._replace(
        files=files, labels=test.labels[keep], fingerprints=test.fingerprints[keep]
    )


def data_notes(info: DatasetInfo, split: str) -> list[str]:
    """Lines to log about the files an image folder's scan of `split` skipped or ignored."""
    if f"{split}_scan" not in info.details:
        return []
    scan = info.details[f"{split}_scan"]
    files, bad, ignored, cached = scan.files, scan.bad, scan.ignored, scan.cached
    notes = []
    without = info.details.get("without_images", {}).get(split)
    if without:
        notes.append(
            f"{split}: left out {len(without)} folder(s) without images, which are not classes: "
            + ", ".join(without[:5])
            + (", ..." if len(without) > 5 else "")
        )
    if scan.runs:
        notes.append(
            f"{split}: left out {len(scan.runs)} vit_jax run folder(s) inside class folders "
            f"(their PNGs are not data), e.g. {scan.runs[0]}"
        )
    test_dir = info.details.get("test_dir")
    if split == "test" and test_dir and os.path.basename(test_dir) != "test":
        notes.append(f"test: the images of {test_dir}")
    if split == "test" and "held_out" in info.details:
        directory, fraction = info.details["held_out"]
        train_scan = info.details.get("train_scan")
        share = (
            f" ({len(files) / (len(files) + len(train_scan.files)):.1%} of the images)"
            if train_scan
            else ""
        )
        notes.append(
            f"test: {len(files)} images{share}, about {fraction:.0%} of each class of {directory}, "
            "held out of training (--config.test_fraction; chosen by file name: the same files in "
            "every run, and images added later do not move earlier ones)"
        )
    copies = info.details.get("test_copies") if split == "test" else None
    if copies:
        notes.append(
            f"test: left out {len(copies)} image(s) that are byte-for-byte copies of training "
            f"images, which would count as unseen, e.g. {copies[0][0]} (= {copies[0][1]})"
        )
    if cached:
        notes.append(
            f"{split}: {cached} images unchanged since an earlier run decoded them were not "
            f"decoded again (the scan cache in {os.path.join(cache_dir(), 'scans')})"
        )
    if bad:
        path, reason = bad[0]
        notes.append(
            f"{split}: skipped {len(bad)} unreadable image(s) (--config.skip_bad_images), "
            f"e.g. {path} ({reason})"
        )
    if ignored:
        notes.append(
            f"{split}: ignored {len(ignored)} file(s) whose extension is not one of "
            f"{', '.join(IMAGE_EXTENSIONS)}, e.g. {ignored[0]}"
        )
    return notes


def _class_dirs(split_dir: str) -> list[str]:
    """Class folders of a split; hidden ones (.ipynb_checkpoints, ...) are not classes."""
    return sorted(
        d
        for d in os.listdir(split_dir)
        if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d))
    )


def _image_classes(split_dir: str) -> tuple[list[str], list[str]]:
    """(class folders, those of them that hold an image) of a split (`_class_dirs`, `_has_image`)."""
    folders = _class_dirs(split_dir)
    return folders, [c for c in folders if _has_image(os.path.join(split_dir, c))]


def _visible_files(directory: str, runs: list[str] | None = None) -> Iterator[str]:
    """Files under `directory`, sub-folders included, in a fixed (sorted) order; hidden folders
    and files (.ipynb_checkpoints, macOS ._*) left out. Symbolic links to folders are followed,
    each real folder once; a link to a folder that holds `directory` (a loop) is not followed.
    With a `runs` list (the image-folder dataset's scans), `vit_jax.train` run directories (whose
    curves.png is not data) are left out too, and appended to it."""
    top, seen = os.path.realpath(directory), set()
    for here, folders, names in os.walk(directory, followlinks=True):
        real = os.path.realpath(here)
        if real in seen or (real != top and top.startswith(real + os.sep)):
            folders[:] = []
            continue
        if runs is not None and is_run_directory(here):
            runs.append(here)
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                yield os.path.join(here, name)


def image_files(
    directory: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS, runs: list[str] | None = None
) -> Iterator[str]:
    """Files under `directory` ending in `extensions` (any case), sub-folders included, in a fixed
    (sorted) order; hidden folders and files (.ipynb_checkpoints, macOS ._*) left out, and run
    directories with a `runs` list (see `_visible_files`)."""
    return (path for path in _visible_files(directory, runs) if path.lower().endswith(extensions))


def _has_image(directory: str) -> bool:
    """Whether a folder of an image-folder dataset holds an image outside run directories."""
    return next(image_files(directory, runs=[]), None) is not None


def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: a fixed stratified 80/20 split; images uint8 (N, 8, 8, 1)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    return (x_train, y_train) if split == "train" else (x_test, y_test)


def get_info(config: Any, download: bool = False, disjoint: bool = True) -> DatasetInfo:
    """Number and names of classes, and where the data comes from.

    `download=True` readies the data before any other work, so that a problem is one DataError
    then: it downloads and prepares a TFDS dataset (once; later calls find it ready; some, like
    CIFAR, learn their class names from the download), and decodes every image of an image
    folder's train and test splits (the result is kept in the returned info for the pipelines).
    With `disjoint` (the model trains, or trained, on `config.train_split`) a TFDS test split that
    shares examples with the train split is a SharedSplitsError once the dataset is prepared.
    """
    if config.dataset == "digits":
        return DatasetInfo("digits", 10, [str(i) for i in range(10)], "digits")
    if os.path.isdir(config.dataset):
        root = config.dataset
        train, test = folder_dirs(root)
        flat = train == root  # ROOT/<class>/<file>, no train/
        layouts = (
            "ROOT/train/<class>/<file> with ROOT/test/ (or val/, validation/) alike, or "
            "ROOT/<class>/<file> with --config.test_fraction"
        )
        misplaced = _test_dir(root) if flat else None
        if misplaced:
            raise DataError(
                f"image folder {root} has {os.path.basename(misplaced)}/ but no train/ ({layouts})"
            )
        folders, classes = _image_classes(train)
        if not folders:
            raise DataError(f"image folder {root} has no class folders ({layouts})")
        # A folder without images (__MACOSX from a zip, an empty one) is not a class: it would
        # add a head output that no image trains.
        if not classes:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {train}")
        without_images = {"train": [c for c in folders if c not in classes]}
        # Checked now, not when the first evaluation comes after hours of training.
        if test is None and not config.test_fraction and flat:
            raise DataError(
                f"image folder {root} has class folders but no test split: hold out a share of "
                "each class's images with --config.test_fraction=0.1, or split them into "
                "ROOT/train/<class>/ and ROOT/test/<class>/"
            )
        if test is None and not config.test_fraction:
            raise DataError(
                f"image folder {root} has train/ but no test/ (or val/, validation/) folder: add "
                "one with the same class folders, or hold out a share of each class's train "
                "images with --config.test_fraction=0.1"
            )
        if test is not None and config.test_fraction:
            raise DataError(
                f"image folder {root} has its own test split ({test}); --config.test_fraction "
                "is for folders without one: leave it at 0"
            )
        if test:
            test_folders, test_classes = _image_classes(test)
            without_images["test"] = [
                c for c in test_folders if c not in test_classes and c not in classes
            ]
            extra = [c for c in test_classes if c not in classes]
            if extra:
                raise DataError(
                    f"{test} has class folders that {train} lacks ({', '.join(extra)}): a model "
                    "trained on train/'s classes cannot be scored on them; add them to train/ "
                    "too, or remove them"
                )
            if not test_classes:
                raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {test}")
        info = DatasetInfo(
            os.path.basename(os.path.normpath(root)), len(classes), classes, "folder"
        )
        info.details["without_images"] = without_images
        if test is None:
            info.details["held_out"] = (train, config.test_fraction)
        info.details["test_dir"] = test
        if download:  # every image checked now, not when the shuffle or an evaluation reaches it
            for split in ("train", "test"):
                _scan(config, info, split)
        return info
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(config.dataset, data_dir=config.tfds_data_dir or None)
    except Exception as e:  # tfds raises its own DatasetNotFoundError, among others
        if os.sep in config.dataset or config.dataset.startswith((".", "~")):
            raise DataError(
                f"image folder {config.dataset} not found (a folder ROOT with "
                "ROOT/{train,test}/<class>/<file>, or ROOT/<class>/<file>)"
            ) from None
        import difflib

        name = config.dataset.lower()
        close = difflib.get_close_matches(name, list(TFDS_SPLITS), n=2)  # the presets' first
        close += difflib.get_close_matches(name, tfds.list_builders(), n=3)
        close = list(dict.fromkeys(close))[:3]
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise DataError(
            f"unknown dataset {config.dataset!r}: not a TFDS dataset name, an image folder with "
            f"train/ and test/, or 'digits' ({type(e).__name__}: {first_line(e)}){hint}"
        ) from None
    _check_features(builder, config)  # before a download that could not be used
    if download:
        _download_and_prepare(builder, config)  # sets CIFAR's names on this builder's info
        # (Splits are known once prepared; tfds.testing.mock_data leaves them empty.)
        checks = zip(("train_split", "test_split"), _splits(config), strict=True)
        for field, spec in checks if builder.info.splits else ():
            try:
                builder.info.splits[spec]
            except (KeyError, ValueError, AssertionError) as e:
                raise DataError(
                    f"TFDS dataset {config.dataset!r} has no split {spec!r} "
                    f"({first_line(e)[:200]}); its splits: {', '.join(builder.info.splits)}. "
                    f"Choose one with --config.{field}=..., or carve both out of one split: "
                    "--config.train_split='train[:90%]' --config.test_split='train[90%:]'"
                ) from None
        if builder.info.splits and disjoint:
            _check_disjoint(builder, config)
    label = builder.info.features[config.label_key]
    names = list(getattr(label, "names", None) or [str(i) for i in range(label.num_classes)])
    return DatasetInfo(config.dataset, label.num_classes, names, "tfds")


def labelled_folder(
    root: str,
    class_names: list[str] | None = None,
    skip_bad: bool = False,
    num_classes: int | None = None,
) -> DatasetInfo:
    """A folder of new labelled images to score a trained model on, every image in the test split:
    the class folders of ROOT/test/ (or val/, validation/) when it has one, else of ROOT itself
    (ROOT/<class>/<image>); no train/ is needed. With `class_names` (the model's classes in label
    order) the folders may be any of those classes, as many as there are, and an image's label is
    its folder's index in `class_names`; a folder of another name is a DataError. Without, the
    folders (sorted) are the classes, and there must be `num_classes` of them if that is given
    (checked before any image is decoded). The images are checked as training checks them (see
    `_folder_files`), and the returned info holds them for `eval_batches`."""
    if not os.path.isdir(root):
        raise DataError(f"image folder {root} not found")
    directory = _test_dir(root) or root
    folders, present = _image_classes(directory)
    if not present:
        raise DataError(
            f"no class folders with images ({', '.join(IMAGE_EXTENSIONS)}) in {directory}; "
            "lay the images out as ROOT/<class>/<image> or ROOT/test/<class>/<image>"
        )
    if class_names is None and num_classes is not None and len(present) != num_classes:
        raise DataError(
            f"{directory} has {len(present)} class folders with images and the model "
            f"{num_classes} classes: without the model's class names the folders, sorted, are "
            "taken as its classes, so their numbers must be equal (with its class names, a "
            "run's labels.txt, they are matched by name)"
        )
    names = list(present if class_names is None else class_names)
    unknown = [c for c in present if c not in names]
    if unknown:
        listed = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise DataError(
            f"{directory} has class folders that are not among the model's {len(names)} classes: "
            f"{', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''} (the model's: "
            f"{listed}); the model cannot predict them, so rename or remove those folders"
        )
    info = DatasetInfo(os.path.basename(os.path.normpath(root)), len(names), names, "folder")
    info.details["without_images"] = {"test": [c for c in folders if c not in present]}
    info.details["test_dir"] = directory if directory != root else None
    info.details["test_classes"] = present
    info.details["test_scan"] = _folder_files(root, "test", names, skip_bad, split_dir=directory)
    return info


def training_images(config: Any) -> FolderSplit:
    """The checked training images of the image-folder dataset that `config` names (a run's)."""
    return _scan(config, get_info(config), "train")


def without_training_copies(info: DatasetInfo, training: FolderSplit) -> None:
    """Leaves out of `info`'s test split (an image folder's, checked) the images that are
    byte-for-byte copies of one of `training` (`training_images`), as training leaves them out of
    its own test split; the (test, train) pairs go to info.details['test_copies'] (`data_notes`).
    A DataError if every test image is such a copy."""
    info.details["test_scan"] = _without_copies(info.details["test_scan"], training, info)


def _check_disjoint(builder: Any, config: Any) -> None:
    """Refuses train and test splits that share examples (`train` with `test_split='train[90%:]'`):
    the test accuracy would count images the model was trained on."""
    train_spec, test_spec = _splits(config)

    def ranges(spec: str) -> list[tuple[str, int, int]]:
        out = []
        for fi in builder.info.splits[spec].file_instructions:
            end = fi.examples_in_shard if fi.take < 0 else fi.skip + fi.take
            out.append((fi.filename, fi.skip, end))
        return out

    shared = sum(
        max(0, min(end_a, end_b) - max(start_a, start_b))
        for file_a, start_a, end_a in ranges(train_spec)
        for file_b, start_b, end_b in ranges(test_spec)
        if file_a == file_b
    )
    if shared:
        raise SharedSplitsError(
            f"the train split {train_spec!r} and the test split {test_spec!r} of TFDS dataset "
            f"{config.dataset!r} share {shared} examples, so the test accuracy would count images "
            "the model trained on; make them disjoint, e.g. --config.train_split='train[:90%]' "
            "--config.test_split='train[90%:]'",
            train_spec,
            test_spec,
            shared,
        )


def _check_features(builder: Any, config: Any) -> None:
    """A TFDS dataset must have an 'image' and a class label (`config.label_key`) to train on."""
    import tensorflow_datasets as tfds

    features = builder.info.features
    kinds = dict(features.items())
    labels = [name for name, f in kinds.items() if isinstance(f, tfds.features.ClassLabel)]
    if not isinstance(kinds.get("image"), tfds.features.Image):
        raise DataError(
            f"TFDS dataset {config.dataset!r} has no 'image' feature of images to classify "
            f"(its features: {', '.join(kinds)})"
        )
    if not isinstance(kinds.get(config.label_key), tfds.features.ClassLabel):
        what = "is not a class label" if config.label_key in kinds else "does not exist"
        choose = (
            f"its class labels: {', '.join(labels)}; choose one with --config.label_key=..."
            if labels
            else f"it has no class-label feature (its features: {', '.join(kinds)})"
        )
        raise DataError(
            f"TFDS dataset {config.dataset!r}: the label feature {config.label_key!r} {what}; "
            + choose
        )


# Where TFDS fetches a prepared copy of many datasets from (its gs://tfds-data bucket), before
# their own download addresses.
TFDS_MIRRORS = ("https://storage.googleapis.com", "https://www.googleapis.com")


def unreachable(urls: list[str], timeout: float = 5.0) -> str | None:
    """None when this machine opens a connection to the host of one of `urls` (tried in order,
    `timeout` seconds each), or when a proxy is set (HTTPS_PROXY and the like, or the system's
    settings on macOS and Windows, as `requests` finds them: it reaches them for this machine);
    else why the first one failed, "host: reason"."""
    import socket
    from urllib.parse import urlsplit
    from urllib.request import getproxies

    if {"http", "https", "all"} & set(getproxies()):
        return None
    reasons = []
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            continue
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            return None
        except OSError as e:  # no such host (DNS), refused, unreachable, timed out
            reasons.append(f"{parts.hostname}: {str(e) or type(e).__name__}")
    return reasons[0] if reasons else None


def _check_network(builder: Any, config: Any) -> None:
    """A DataError at once when a dataset TFDS must download comes from hosts this machine cannot
    reach: TFDS's downloader retries a failed connection 10 times with growing pauses, 3.4 minutes
    before it gives up. Datasets prepared already, fetched by hand (their addresses are those of
    the archives to fetch) or replaced by `tfds.testing.mock_data` (its own download_and_prepare)
    are left alone."""
    own = type(builder).download_and_prepare.__module__.startswith("tensorflow_datasets.core")
    urls = list(getattr(builder, "url_infos", None) or ())
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if not own or not urls or manual or builder.data_path.exists():  # (TFDS's "prepared" test)
        return
    reason = unreachable([*urls, *TFDS_MIRRORS])
    if reason is None:
        return
    name, folder = config.dataset, builder.name
    command = f"import tensorflow_datasets as tfds; tfds.builder('{name}').download_and_prepare()"
    raise DataError(
        f"cannot download the TFDS dataset {name!r}: this machine reaches none of the hosts it "
        f"comes from ({reason}). On a machine with a network, prepare it with "
        f'`python -c "{command}"` and copy its folder (~/tensorflow_datasets/{folder}/) to '
        f"{os.path.join(os.fspath(builder.data_dir_root), folder)}/ here, or into a directory "
        "passed with --tfds_data_dir; behind a proxy, set HTTPS_PROXY."
    )


def _download_and_prepare(builder: Any, config: Any) -> None:
    """TFDS's download_and_prepare (a no-op once the data is ready); failures become one DataError."""
    import tensorflow_datasets as tfds

    _check_network(builder, config)
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=config.tfds_manual_dir or None)
        )
    except Exception as e:  # network errors, a missing manual download, a full disk, ...
        instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
        if instructions and "manual directory" in str(e).lower():
            # TFDS's own message ends in a multi-line how-to, which a first line would cut off.
            raise DataError(
                f"the TFDS dataset {config.dataset!r} must be downloaded by hand: "
                f"{first_line(e).removesuffix(':')}: {' '.join(instructions.split())} "
                "Put the files in one directory and pass it with --tfds_manual_dir."
            ) from None
        raise DataError(
            f"could not download or prepare the TFDS dataset {config.dataset!r} in "
            f"{builder.data_dir} ({type(e).__name__}: {first_line(e)[:300]}). Check the network "
            "connection and the free disk space; a dataset that must be fetched by hand (e.g. imagenet2012) goes "
            "in --tfds_manual_dir, and one prepared elsewhere is found with --tfds_data_dir."
        ) from None


def _raw_dataset(config: Any, info: DatasetInfo, split: str, train: bool):
    """An unbatched tf.data.Dataset of {'image': encoded bytes or uint8 HWC, 'label': int64}."""
    tf = _tf()
    train_split, test_split = _splits(config)
    if info.source == "digits":
        images, labels = _digits_split("train" if train else "test")
        return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels}), False
    if info.source == "folder":
        files, labels = _scan(config, info, "train" if train else "test")[:2]
        ds = tf.data.Dataset.from_tensor_slices({"file": files, "label": labels})
        return ds.map(lambda d: {"image": tf.io.read_file(d["file"]), "label": d["label"]}), True
    import tensorflow_datasets as tfds

    builder = tfds.builder(config.dataset, data_dir=config.tfds_data_dir or None)
    _download_and_prepare(builder, config)
    ds = builder.as_dataset(
        split=train_split if train else test_split,
        decoders={"image": tfds.decode.SkipDecoding()},
        shuffle_files=False,
        read_config=tfds.ReadConfig(shuffle_seed=config.seed),
    )
    return ds.map(lambda d: {"image": d["image"], "label": d[config.label_key]}), True


def _decode(image, encoded: bool):
    tf = _tf()
    if encoded:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    elif image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    elif image.shape[-1] == 4:
        image = image[..., :3]
    image.set_shape([None, None, 3])
    return image


def _normalize(image):
    tf = _tf()
    return tf.cast(image, tf.float32) / 127.5 - 1.0


def preprocess_train(image, index, config: Any, encoded: bool):
    """Random area crop -> resize -> random flip -> [-1, 1]; randomness keyed on (seed, index)."""
    tf = _tf()
    seed = tf.stack([tf.constant(config.seed, tf.int64), tf.cast(index, tf.int64)])
    image = _decode(image, encoded)
    lo, hi = config.crop_area
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.zeros([1, 0, 4]),
        seed=seed,
        area_range=(lo, hi),
        aspect_ratio_range=(3 / 4, 4 / 3),
        min_object_covered=0.0,
        use_image_if_no_bounding_boxes=True,
    )
    image = tf.slice(image, begin, size)
    image = tf.image.resize(image, image_hw(config.image_size), method="bilinear", antialias=True)
    if config.random_flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
    return tf.clip_by_value(image / 127.5 - 1.0, -1.0, 1.0)


def preprocess_eval(image, config: Any, encoded: bool):
    tf = _tf()
    image = _decode(image, encoded)
    image = tf.image.resize(image, image_hw(config.image_size), method="bilinear", antialias=True)
    return tf.clip_by_value(image / 127.5 - 1.0, -1.0, 1.0)


# ----------------------------------------------------------------------------- batches


def train_batches(
    config: Any,
    info: DatasetInfo,
    local_batch: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches for this process: {'image': (B, H, W, 3) float32, 'label': (B,)}.

    `start_step` skips the examples of the first `start_step` batches (without decoding them), so a
    resumed run sees exactly the batches an uninterrupted one would.

    With several processes, every process orders the (undecoded) examples the same way and keeps only
    its rows of each global batch of `local_batch * process_count`: process i decodes and augments rows
    [i * local_batch, (i + 1) * local_batch). The global batch, and so every number of the run, is the
    same for any number of processes.
    """
    tf = _tf()
    ds, encoded = _raw_dataset(config, info, "train", train=True)
    ds = ds.shuffle(config.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True).repeat()
    ds = ds.enumerate()
    if process_count > 1:
        global_batch = local_batch * process_count
        ds = ds.filter(lambda i, d: (i % global_batch) // local_batch == process_index)
    ds = ds.skip(start_step * local_batch)
    ds = ds.map(
        lambda i, d: {
            "image": preprocess_train(d["image"], i, config, encoded),
            "label": d["label"],
        },
        num_parallel_calls=parallel_calls(),
        deterministic=True,
    )
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _named_decode_errors(numpy_iterator(ds), config)


def eval_batches(
    config: Any,
    info: DatasetInfo,
    local_batch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Every test example exactly once, in batches padded to `local_batch`.

    Yields {'image', 'label', 'mask'}: `mask` is 1 for real examples and 0 for the padding of the last
    batch, so metrics count each example once (the reference drops the last partial batch).

    With several processes, every process walks the same global batches of `local_batch *
    process_count` examples and decodes only its rows of each, so all processes yield the same number
    of batches (the collective evaluation step needs that) and the global batches are those of a
    single process.
    """
    tf = _tf()
    ds, encoded = _raw_dataset(config, info, "test", train=False)
    global_batch = local_batch * process_count
    h, w = image_hw(config.image_size)
    lo = process_index * local_batch

    def prepare(i, d):
        mine = tf.logical_and(i % global_batch >= lo, i % global_batch < lo + local_batch)
        image = tf.cond(
            mine,
            lambda: preprocess_eval(d["image"], config, encoded),
            lambda: tf.zeros([h, w, 3], tf.float32),
        )
        return {"image": image, "label": d["label"]}

    ds = ds.enumerate().map(prepare, num_parallel_calls=parallel_calls())
    ds = ds.batch(global_batch, drop_remainder=False).prefetch(tf.data.AUTOTUNE)
    for batch in _named_decode_errors(numpy_iterator(ds), config):
        n = max(0, min(local_batch, len(batch["label"]) - lo))
        pad = local_batch - n
        yield {
            "image": np.pad(batch["image"][lo : lo + n], [(0, pad), (0, 0), (0, 0), (0, 0)]),
            "label": np.pad(batch["label"][lo : lo + n], [(0, pad)]),
            "mask": np.pad(np.ones(n, np.float32), [(0, pad)]),
        }


def _named_decode_errors(batches: Iterator, config: Any) -> Iterator:
    """`batches`, with a decoding error inside tf.data (an image the up-front checks let through)
    raised as one DataError instead of TensorFlow's op traceback."""
    tf = _tf()
    try:
        yield from batches
    except tf.errors.InvalidArgumentError as e:
        raise DataError(
            f"TensorFlow could not decode an image of {config.dataset} ({_tf_message(e)}). Convert the "
            "dataset's images to PNG or JPEG, or remove the one that fails"
        ) from None


def _tf_message(error: Exception) -> str:
    """A TensorFlow op error's first line without its {{function_node ...}} and [Op:...] tags."""
    import re

    return re.sub(r"^\{\{[^}]*\}\}\s*|\s*\[Op:\w+\].*$", "", first_line(error))
