"""Top-k labels for images, from a published checkpoint or a fine-tuned run.

    python -m vit_jax.predict --model ViT-B_16 --checkpoint ViT-B_16_imagenet2012.npz cat.jpg photos/
    python -m vit_jax.predict --workdir runs/my-run --top_k 3 --json test_images/

The resolution comes from the checkpoint's position embeddings unless --image_size is given. Images are
processed in fixed-size batches (one compilation for any number of files); unreadable files and
folders without images are reported by name on stderr and the rest are still predicted. Exit status:
0 when every image was predicted, 1 when some could not be read, 2 for a usage error or when there is
no image at all.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import types
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

import numpy as np

from vit_jax.commands import exit_out_of_memory, interruptible, positive_int, prog, user_path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-2012 class names in label order (shipped with the package)."""
    text = resources.files("vit_jax").joinpath("data/imagenet2012_labels.txt").read_text()
    return [
        line.split("\t", 1)[1] for line in text.splitlines() if line and not line.startswith("#")
    ]


def run_directory(path: str | None) -> str | None:
    """The `vit_jax.train` run directory that a local checkpoint path is, or lies in (its
    checkpoints/ or best/, or one step of them); None for files, URLs and other directories."""
    if not path or not os.path.isdir(path):
        return None
    here = os.path.abspath(path)
    for _ in range(3):
        if any(os.path.exists(os.path.join(here, f)) for f in ("config.json", "labels.txt")):
            return here
        here = os.path.dirname(here)
    return None


def _label_file(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def run_class_names(workdir: str) -> list[str] | None:
    """A run's class names: its labels.txt, or the eval.json of runs from before labels.txt; None
    when it recorded neither."""
    if os.path.exists(os.path.join(workdir, "labels.txt")):
        return _label_file(os.path.join(workdir, "labels.txt"))
    if os.path.exists(os.path.join(workdir, "eval.json")):
        with open(os.path.join(workdir, "eval.json")) as f:
            return json.load(f)["class_names"]
    return None


def read_labels(spec: str | None, num_classes: int, workdir: str | None = None) -> list[str]:
    """Label names: 'imagenet2012', a file with one name per line, a run's classes
    (`run_class_names`), or indices."""
    run_names = run_class_names(workdir) if workdir and not spec else None
    if spec == "imagenet2012" or (spec is None and workdir is None and num_classes == 1000):
        names = imagenet_labels()
    elif spec:
        names = _label_file(spec)
    elif run_names is not None:
        names = run_names
    else:
        names = [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(
            f"{len(names)} label names for a model with {num_classes} classes "
            f"({spec or os.path.join(workdir or '', 'labels.txt')})"
        )
    return names


def find_images(paths: Sequence[str]) -> list[str]:
    """Files as given, and image files under directories (sorted; hidden ones left out)."""
    from vit_jax.input_pipeline import image_files

    files = []
    for path in paths:
        if os.path.isdir(path):
            files += image_files(path, IMAGE_EXTENSIONS)
        else:
            files.append(path)
    return files


def load_image(path: str, size: tuple[int, int]) -> np.ndarray:
    """RGB image resized (bilinear, antialiased) to `size`=(H, W), float32 in [-1, 1].

    Images over PIL's limit against decompression bombs (`Image.MAX_IMAGE_PIXELS`, 89M pixels:
    PIL refuses twice that) are decoded as evaluation and training decode every image, by
    TensorFlow, which accepts them.
    """
    from PIL import Image

    try:
        return _load_with_pil(path, size)
    except Image.DecompressionBombError:
        from vit_jax import input_pipeline

        tf = input_pipeline._tf()
        config = types.SimpleNamespace(image_size=tuple(size))  # all preprocess_eval reads
        image = input_pipeline.preprocess_eval(tf.io.read_file(path), config, encoded=True)
        return image.numpy()


def _load_with_pil(path: str, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
            # 16-bit greyscale: PIL's convert would clip it to white; scale to 8 bits as the
            # training pipeline's decoder (TensorFlow) does.
            levels = np.asarray(im, np.float32) * (255.0 / 65535.0)
            im = Image.fromarray(np.round(levels).astype(np.uint8), "L")
        im = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(im, np.float32) / 127.5 - 1.0


def _batches(
    files: list[str], size, batch: int, errors: list
) -> Iterator[tuple[list[str], np.ndarray]]:
    names, images = [], []
    for path in files:
        try:
            images.append(load_image(path, size))
            names.append(path)
        except Exception as e:  # PIL raises many types for bad files; report and go on
            errors.append((path, f"{type(e).__name__}: {e}"))
            continue
        if len(names) == batch:
            yield names, np.stack(images)
            names, images = [], []
    if names:
        yield names, np.stack(images)


def input_size(model: Any, params: Any) -> tuple[int, int]:
    """The (H, W) in pixels that the params' position embeddings were made for."""
    from vit_jax.checkpoint import infer_config

    gh, gw = infer_config(params)["grid_size"]
    return gh * model.stride[0], gw * model.stride[1]


@functools.cache
def _probabilities_fn(model: Any) -> Any:
    """`model`'s softmax probabilities, compiled once per model and input shape (a new function per
    call compiled again every time: 2.1 s per `top_k` call of two ViT-B/16 images on a 2-core CPU)."""
    import jax
    import jax.numpy as jnp

    # Params are an argument, not a closure: closed-over arrays become constants of the compiled
    # program (hundreds of MB for ViT-B, and XLA:CPU's constant folding then gave NaN softmaxes).
    from vit_jax import parallel

    @jax.jit
    def probabilities(params, images):
        logits = parallel.apply_in_blocks(model, params, images)  # one device
        return jax.nn.softmax(logits.astype(jnp.float32))

    return probabilities


def _top(p: np.ndarray, labels: list[str], k: int) -> list[dict[str, Any]]:
    return [
        {"label": labels[i], "index": int(i), "probability": float(p[i])}
        for i in np.argsort(-p)[:k]
    ]


def top_k(
    model: Any, params: Any, images: np.ndarray, labels: list[str], k: int = 5
) -> list[list[dict[str, Any]]]:
    """Per image of (N, H, W, 3) in [-1, 1]: the k most probable [{'label', 'index', 'probability'}]."""
    probs = np.asarray(_probabilities_fn(model)(params, images))
    return [_top(p, labels, k) for p in probs]


def predict(
    model: Any, params: Any, files: list[str], labels: list[str], top_k: int = 5, batch: int = 32
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """[{'file', 'predictions': [{'label', 'index', 'probability'}...]}], [(file, error)].

    Images are resized to the resolution of the params' position embeddings.
    """
    h, w = input_size(model, params)
    probabilities = _probabilities_fn(model)
    results, errors = [], []
    for names, images in _batches(files, (h, w), batch, errors):
        n = len(names)
        padded = np.pad(images, [(0, batch - n), (0, 0), (0, 0), (0, 0)])  # one shape, one compile
        probs = np.asarray(probabilities(params, padded))[:n]
        for name, p in zip(names, probs, strict=True):
            results.append({"file": name, "predictions": _top(p, labels, top_k)})
    return results, errors


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model/--checkpoint/--workdir/--image_size, shared by the predict, evaluate and
    visualize commands."""
    parser.add_argument("--model", help="model name (default: read from the checkpoint's shapes)")
    parser.add_argument(
        "--checkpoint",
        type=user_path,
        help=".npz (local path, gs://, https://), or a run directory, its checkpoints/ or best/",
    )
    parser.add_argument(
        "--workdir",
        type=user_path,
        help="a vit_jax.train run directory (its model.npz, else its latest checkpoint, and its "
        "class names)",
    )
    parser.add_argument(
        "--image_size", type=positive_int, help="resolution (default: the checkpoint's)"
    )


def labels_run(args: argparse.Namespace) -> str | None:
    """The run directory whose class names label the predictions: --workdir, or the run that
    --checkpoint lies in."""
    return args.workdir or run_directory(args.checkpoint)


def load_model_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple:
    """(model, params) for the arguments of `add_model_arguments`; usage or load errors exit cleanly."""
    from vit_jax import checkpoint

    path = args.checkpoint or (os.path.join(args.workdir, "model.npz") if args.workdir else None)
    if path is None:
        parser.error("give --checkpoint FILE.npz or --workdir RUN_DIR")
    if not args.checkpoint and not os.path.exists(path):
        steps = checkpoint.saved_steps(os.path.join(args.workdir, "checkpoints"))
        if not steps:
            print(
                f"error: {args.workdir} has no model.npz (a run writes it when it ends, unless "
                "export_npz is off) nor a saved checkpoint yet; give a run directory that "
                "has one, or --checkpoint FILE.npz",
                file=sys.stderr,
            )
            sys.exit(2)
        print(
            f"{args.workdir} has no model.npz (written when a run ends): using its latest "
            f"checkpoint, step {steps[-1]}",
            file=sys.stderr,
        )
        path = args.workdir
    try:
        return checkpoint.load_pretrained_model(args.model, path, image_size=args.image_size)
    except (checkpoint.CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog("vit_jax.predict"), description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("images", nargs="+", type=user_path, help="image files and/or directories")
    add_model_arguments(parser)
    parser.add_argument(
        "--labels",
        type=user_path,
        help="'imagenet2012' or a file with one label per line "
        "(default: ImageNet names for 1000 classes, a run's classes, else indices)",
    )
    parser.add_argument(
        "--top_k", type=positive_int, default=5, help="labels per image (default 5)"
    )
    parser.add_argument(
        "--batch", type=positive_int, default=32, help="images per forward pass (default 32)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    files, empty = [], []
    for path in args.images:  # checked before the model loads (it may be a download)
        found = find_images([path])
        if not found and os.path.isdir(path):
            empty.append((path, f"no image files ({' '.join(IMAGE_EXTENSIONS)}) in this folder"))
        files += found
    if not files:
        print(
            f"error: no image files ({' '.join(IMAGE_EXTENSIONS)}) in {' '.join(args.images)}; "
            "give image files or folders that hold some",
            file=sys.stderr,
        )
        sys.exit(2)
    model, params = load_model_from_args(parser, args)
    try:
        labels = read_labels(args.labels, model.num_classes, labels_run(args))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        results, errors = predict(model, params, files, labels, args.top_k, args.batch)
    except RuntimeError as e:  # jax.errors.JaxRuntimeError
        exit_out_of_memory(e, f"predicting batches of {args.batch} images")
    errors = empty + errors
    for name, error in errors:
        print(f"could not read {name}: {error}", file=sys.stderr)
    if args.json:
        print(
            json.dumps({"results": results, "errors": [{"file": f, "error": e} for f, e in errors]})
        )
    else:
        for r in results:
            top = ", ".join(f"{p['label']} {p['probability']:.3f}" for p in r["predictions"])
            print(f"{r['file']}: {top}")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
