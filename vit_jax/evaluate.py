"""Test accuracy of a checkpoint on a labelled dataset: a published classifier or a fine-tuned run.

    python -m vit_jax.evaluate --checkpoint ViT-B_16_imagenet2012.npz --dataset imagenet2012
    python -m vit_jax.evaluate --workdir runs/my-run                # the run's own test split
    python -m vit_jax.evaluate --workdir runs/my-run --dataset ~/more_photos --json

The checkpoint keeps its head, so its classes must be the dataset's, in the dataset's order: a run's
class names (labels.txt) are checked against the dataset's. A folder of new images without train/
(NEW/<class>/<image>, or NEW/test/<class>/<image>) is scored whole, its class folders matched to the
run's class names by name (any number of them), and copies of the run's training images left out.
A run's dataset, data settings and compute dtype come from its config.json unless given; on the TFDS
dataset it trained on, a --split that shares examples with its train split is refused. Images are
preprocessed as training evaluates them (resized to the checkpoint's resolution, or --image_size),
every test example counted once. Prints the accuracy, loss, per-class precision/recall/F1 and (up to
20 classes) the confusion matrix, as a training run ends; --json prints every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from vit_jax.commands import exit_out_of_memory, interruptible, positive_int, prog, user_path

# The training settings that say which examples are read and how (a run's config.json has them).
DATA_FIELDS = (
    "dataset",
    "tfds_data_dir",
    "tfds_manual_dir",
    "label_key",
    "train_split",
    "test_split",
    "test_fraction",
    "skip_bad_images",
)


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1)")
    return value


class EvaluationError(ValueError):
    """A checkpoint and dataset that do not go together; the message says how to fix it."""


def run_settings(run: str | None) -> dict[str, Any]:
    """The settings of the run directory `run` as its config.json records them ({} without one)."""
    path = os.path.join(run, "config.json") if run else None
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise EvaluationError(
                f"{path} is not the JSON a run writes ({e}); give the settings as options"
            ) from None


def data_config(
    recorded: dict[str, Any], image_size: tuple[int, int] = (384, 384), **given: Any
) -> Any:
    """The training config that `input_pipeline` reads for evaluation: `train.default_config()`,
    then the data settings among a run's `recorded` ones (`run_settings`), then `given` (None values
    are left out), at `image_size` (H, W)."""
    import ml_collections

    from vit_jax import train

    fields = train.default_config().to_dict()
    fields.update({k: recorded[k] for k in DATA_FIELDS if recorded.get(k) is not None})
    fields.update({k: v for k, v in given.items() if v is not None})
    fields["image_size"] = tuple(image_size)
    return ml_collections.ConfigDict(fields)


# input_pipeline's messages name training's `--config.X` options; this command's for the same.
_FLAGS = (
    ("--config.test_split", "--split"),
    ("--config.test_fraction", "--test_fraction"),
    ("--config.skip_bad_images=True", "--skip_bad_images"),
    ("--config.skip_bad_images", "--skip_bad_images"),
    ("--config.label_key", "--label_key"),
)


def own_flags(message: str) -> str:
    """`message` with training's option names replaced by evaluate's."""
    for training_flag, flag in _FLAGS:
        message = message.replace(training_flag, flag)
    return message


def check_batch(batch: int) -> None:
    """EvaluationError unless `batch` divides over this process's devices."""
    import jax

    n_dev = jax.device_count()
    if batch % n_dev:
        raise EvaluationError(
            f"--batch {batch} does not divide over {n_dev} devices: use a multiple of {n_dev}"
        )


def check_head(num_classes: int | None, run_labels: list[str] | None) -> None:
    """Raises EvaluationError unless the checkpoint has a head (`num_classes` outputs) and a run's
    class names (`run_labels`), if any, are one per output."""
    if num_classes is None:
        raise EvaluationError("the checkpoint has no classification head (num_classes=None)")
    if run_labels is not None and len(run_labels) != num_classes:
        raise EvaluationError(
            f"the run recorded {len(run_labels)} class names for {num_classes} classes"
        )


def check_classes(
    num_classes: int | None, run_labels: list[str] | None, dataset_classes: list[str], dataset: str
) -> None:
    """Raises EvaluationError unless the checkpoint's head (`num_classes` outputs; `run_labels`, a
    run's class names) predicts the dataset's classes in the dataset's order."""
    check_head(num_classes, run_labels)
    n = len(dataset_classes)
    if num_classes != n:
        raise EvaluationError(
            f"the checkpoint's head has {num_classes} classes and {dataset} has {n}: evaluate a "
            "checkpoint fine-tuned on this dataset (an ImageNet-21k one has 21843 classes, a "
            "published ImageNet one 1000, for imagenet2012)"
        )
    if run_labels is not None and run_labels != dataset_classes:
        differ = [
            f"{i}: {a!r} in the run, {b!r} in the dataset"
            for i, (a, b) in enumerate(zip(run_labels, dataset_classes, strict=True))
            if a != b
        ]
        raise EvaluationError(
            f"the run's classes are not {dataset}'s, in the same order ({len(differ)} of {n} "
            f"names differ, e.g. class {differ[0]}); its predictions would be scored against the "
            "wrong labels"
        )


def is_new_folder(dataset: str | None, recorded: dict[str, Any], test_fraction: Any) -> bool:
    """Whether `dataset` (--dataset) is a folder of new labelled images, scored whole
    (`input_pipeline.labelled_folder`): an image folder without train/ that is not the run's own
    dataset (`recorded['dataset']`), with no --test_fraction asking for training's hold-out."""
    from vit_jax import input_pipeline

    if dataset is None or test_fraction is not None or not os.path.isdir(dataset):
        return False
    if input_pipeline.folder_dirs(dataset)[0] != dataset:  # it has train/
        return False
    own = recorded.get("dataset")
    return not (own and os.path.isdir(own) and os.path.samefile(own, dataset))


def dataset_info(
    config: Any,
    num_classes: int | None,
    run_labels: list[str] | None = None,
    trained_on: bool = True,
) -> Any:
    """The `input_pipeline.DatasetInfo` of the test split that `config` (see `data_config`) names,
    its data downloaded and checked, for a head of `num_classes` outputs; `run_labels` (a run's
    class names) must be the dataset's. `trained_on`: the checkpoint was trained on this TFDS
    dataset's `config.train_split` (a run on its own dataset), so a test split that shares examples
    with it is refused; False for a checkpoint trained elsewhere (a published one). EvaluationError
    when they do not fit."""
    from vit_jax import input_pipeline

    # The number of classes is known before a TFDS download (class names may not be): a checkpoint
    # that cannot fit is refused before fetching anything.
    known = input_pipeline.get_info(config)
    check_classes(num_classes, None, known.class_names, known.name)
    try:
        info = input_pipeline.get_info(config, download=True, disjoint=trained_on)
    except input_pipeline.SharedSplitsError as e:
        raise EvaluationError(
            f"the split {e.test_split!r} shares {e.shared} examples with {e.train_split!r}, the "
            f"split of {config.dataset} the run trained on, so the accuracy would count images it "
            "trained on: choose a --config.test_split disjoint from it (left unset, it is the run's "
            "own test split)"
        ) from None
    check_classes(num_classes, run_labels, info.class_names, info.name)
    return info


def new_folder_info(
    config: Any,
    num_classes: int | None,
    run_labels: list[str] | None = None,
    recorded: dict[str, Any] | None = None,
) -> tuple[Any, list[str]]:
    """(DatasetInfo, notes to print) for scoring every image of the folder `config.dataset` (see
    `is_new_folder`) with a head of `num_classes` outputs. With `run_labels` (a run's class names)
    the class folders are matched to them by name, and may be any number of them; without, the
    sorted folders are the head's classes. When the run's settings (`recorded`, `run_settings`)
    name an image folder, copies of its training images are left out (`input_pipeline.data_notes`
    names them; a note says why they could not be looked for, if so)."""
    from vit_jax import input_pipeline

    check_head(num_classes, run_labels)
    info = input_pipeline.labelled_folder(
        config.dataset, run_labels, config.skip_bad_images, num_classes
    )
    notes = []
    own = (recorded or {}).get("dataset")
    if own and os.path.isdir(own):
        try:
            seen = input_pipeline.training_images(data_config(recorded))
        except input_pipeline.DataError as e:
            notes.append(f"not compared with the run's training images: {e}")
        else:
            input_pipeline.without_training_copies(info, seen)
    elif own and os.sep in own:  # a folder, not a TFDS name
        notes.append(f"not compared with the run's training images: {own} is gone")
    notes.insert(
        0,
        f"scoring all of {info.details['test_dir'] or config.dataset}: "
        f"{len(info.details['test_scan'].files)} images in {len(info.details['test_classes'])} "
        f"of the model's {info.num_classes} classes",
    )
    return info, notes


def evaluate_checkpoint(
    model: Any,
    params: Any,
    config: Any,
    batch: int = 64,
    run_labels: list[str] | None = None,
    info: Any = None,
) -> tuple[dict[str, Any], list[str]]:
    """Evaluates `params` on the test split that `config` (see `data_config`) names, or on `info`'s
    (`dataset_info`, `new_folder_info`).

    Returns (metrics, class names): the metrics of `train.evaluate` (accuracy, test_loss,
    num_examples, per-class precision/recall/f1/support, confusion_matrix). `batch` images per step,
    divided over the devices of this one process; `run_labels` are checked against the dataset's
    class names. The model computes in its own `dtype`.
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from vit_jax import input_pipeline, parallel, train

    check_batch(batch)
    if info is None:
        info = dataset_info(config, model.num_classes, run_labels)
    mesh = parallel.data_mesh()
    params = jax.device_put(params, NamedSharding(mesh, P()))  # replicated
    eval_step = train.make_eval_step(
        model, parallel.inference_block_tokens(config.cpu_block_tokens)
    )
    batches = input_pipeline.eval_batches(config, info, batch)
    metrics = train.evaluate(
        eval_step, params, batches, NamedSharding(mesh, P("data")), info.num_classes
    )
    return metrics, info.class_names


def score(
    args: argparse.Namespace, run: str | None, model: Any, params: Any
) -> tuple[dict[str, Any], list[str], str]:
    """(metrics, class names, dataset) of `main`'s evaluation: `model` with `params` on the data
    that the options `args` and the run directory `run` (if any) name."""
    from vit_jax import input_pipeline, predict

    recorded = run_settings(run)
    dtype = args.dtype or recorded.get("dtype")
    if dtype in ("float32", "bfloat16"):  # a run evaluated itself in its training dtype
        model = model.clone(dtype=dtype)
    config = data_config(
        recorded,
        predict.input_size(model, params),
        dataset=args.dataset,
        test_split=args.split,
        tfds_data_dir=args.tfds_data_dir,
        tfds_manual_dir=args.tfds_manual_dir,
        label_key=args.label_key,
        test_fraction=args.test_fraction,
        skip_bad_images=args.skip_bad_images or None,
    )
    check_batch(args.batch)
    if args.split and os.path.isdir(config.dataset):
        raise EvaluationError(
            "--split picks a TFDS split; an image folder's test split is its test/ (or val/, "
            "validation/) folder, or the whole folder when it has no train/"
        )
    run_labels = predict.run_class_names(run) if run else None
    if is_new_folder(args.dataset, recorded, args.test_fraction):
        info, notes = new_folder_info(config, model.num_classes, run_labels, recorded)
    else:
        # Only a run's own TFDS dataset has a train split the checkpoint is known to have
        # seen; a published checkpoint may be scored on any split (cifar10's train, say).
        trained_on = recorded.get("dataset") == config.dataset
        info = dataset_info(config, model.num_classes, run_labels, trained_on)
        notes = []
    for line in notes + input_pipeline.data_notes(info, "test"):
        print(own_flags(line), file=sys.stderr)
    metrics, class_names = evaluate_checkpoint(model, params, config, args.batch, info=info)
    return metrics, class_names, config.dataset


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    from vit_jax import predict

    parser = argparse.ArgumentParser(
        prog=prog("vit_jax.evaluate"), description=__doc__.split("\n\n")[0]
    )
    predict.add_model_arguments(parser)
    parser.add_argument(
        "--dataset",
        type=user_path,
        help="a TFDS name, an image folder or 'digits', as for vit_jax.train (default: the run's)",
    )
    parser.add_argument(
        "--split", help="the split to evaluate (default: the dataset's test split, or the run's)"
    )
    parser.add_argument("--tfds_data_dir", type=user_path, help="as for vit_jax.train")
    parser.add_argument("--tfds_manual_dir", type=user_path, help="as for vit_jax.train")
    parser.add_argument("--label_key", help="the TFDS feature to score against (default: label)")
    parser.add_argument(
        "--test_fraction",
        type=fraction,
        help="an image folder without test/: the share of each class held out as in training",
    )
    parser.add_argument(
        "--skip_bad_images",
        action="store_true",
        help="leave out images that cannot be decoded instead of stopping (default: the run's)",
    )
    parser.add_argument(
        "--batch", type=positive_int, default=64, help="images per step over all devices (64)"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="the compute dtype (default: the run's, as in its config.json, else float32)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    run = predict.labels_run(args)
    if args.dataset is None and run is None:
        parser.error("give --dataset (a run directory's checkpoint brings its own)")
    model, params = predict.load_model_from_args(parser, args)

    from vit_jax import input_pipeline, train

    try:
        # stdout carries the report (or the JSON) alone; TFDS prints its download progress there.
        with contextlib.redirect_stdout(sys.stderr):
            metrics, class_names, dataset = score(args, run, model, params)
    except (EvaluationError, input_pipeline.DataError, OSError, ValueError) as e:
        print(f"error: {own_flags(str(e))}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:  # jax.errors.JaxRuntimeError
        exit_out_of_memory(e, f"evaluating batches of {args.batch} images")
    if args.json:
        print(json.dumps({**metrics, "class_names": class_names, "dataset": dataset}))
    else:
        print(train.format_report(metrics, class_names, max_classes=train.REPORT_CLASSES))


if __name__ == "__main__":
    main()
