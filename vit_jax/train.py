r"""Fine-tune a ViT on an image-classification dataset, data-parallel over every device.

    python -m vit_jax.train --model ViT-B_16 --dataset cifar10 --vit_pretrained_dir ~/vit_models
    python -m vit_jax.train --config configs/cifar10.py:ViT-B_16 --config.total_steps=500
    python -m vit_jax.train --config configs/digits.py          # offline demo, embedded dataset

The run directory is {logdir}/{name}. Rerunning the same command resumes from its latest checkpoint
(without --name, the newest unfinished {model}-{dataset}-* run is resumed) at the exact data position
and random state. Importable: `train_and_evaluate(config, workdir)`.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import difflib
import glob
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vit_jax import checkpoint, input_pipeline, models, parallel
from vit_jax.commands import (
    atomic_path,
    byte_size,
    device_memory_gib,
    device_memory_note,
    exit_interrupted,
    first_line,
    host_memory_shortfall,
    out_of_memory,
    started,
)
from vit_jax.parallel import data_mesh, to_device


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


# ----------------------------------------------------------------------------- config


def default_config() -> ml_collections.ConfigDict:
    """Every setting `train_and_evaluate` reads, with the reference's fine-tuning defaults."""
    c = ml_collections.ConfigDict()
    c.model = "ViT-B_16"
    c.model_overrides = ml_collections.ConfigDict()  # VisionTransformer attributes to replace
    c.dataset = "cifar10"  # TFDS name, image folder ROOT/{train,test}/<class>/, or 'digits'
    c.train_split = ""  # '' = the reference's split for the dataset (train[:98%] for CIFAR)
    c.test_split = ""
    c.tfds_data_dir = ""
    c.tfds_manual_dir = ""
    c.label_key = "label"  # the TFDS feature to classify (e.g. label_category for smallnorb)
    c.image_size = 384
    c.crop_area = (0.05, 1.0)  # random crop, fraction of the image area
    c.random_flip = True
    c.shuffle_buffer = 50_000
    # Image folders without ROOT/test/ (or val/): this share of each class's images is the test
    # split (about that share, chosen by a hash of each file's name: the same files in every run,
    # and images added later do not move earlier ones); 0 = require a test folder.
    c.test_fraction = 0.0
    c.skip_bad_images = False  # image folders: skip (and count) unreadable files instead of failing
    c.pretrained = ""  # explicit .npz path / gs:// / https://, or a vit_jax.train run directory
    c.vit_pretrained_dir = "."  # where {model}.npz is looked for when `pretrained` is empty
    c.from_scratch = False
    c.total_steps = 10_000
    c.warmup_steps = 500
    c.batch = 512
    c.batch_eval = 512
    c.accum_steps = 8
    c.base_lr = 0.03
    c.decay_type = "cosine"  # or 'linear'
    c.grad_norm_clip = 1.0
    c.optimizer = "sgd"  # or 'adamw'
    c.momentum = 0.9
    c.momentum_dtype = "bfloat16"  # SGD momentum / AdamW first moment: 'bfloat16' or 'float32'
    c.weight_decay = 0.0
    # Compute dtype: 'float32', 'bfloat16', or 'auto': bfloat16 on TPUs and NVIDIA GPUs from the
    # A100 on, float32 elsewhere (models.default_compute_dtype); config.json records the one used.
    c.dtype = "auto"
    # Attention kernel: 'auto' (cuDNN flash attention on NVIDIA GPUs from the A100 on in bfloat16,
    # XLA's fused attention on other GPUs and TPUs, einsums on CPU), 'cudnn', 'xla' or 'einsum'.
    c.attention = "auto"
    # Memory levers; each gives the same numbers up to float rounding (XLA may sum in another order).
    c.remat = False  # recompute encoder blocks in the backward pass, one at a time
    c.shard_params = False  # FSDP: split params and optimizer state over the devices
    # CPU only: run each device's micro-batch in blocks of at most this many tokens, one after
    # another, so that a block's activations stay in cache (same update; 0 = off).
    c.cpu_block_tokens = parallel.CPU_BLOCK_TOKENS
    # CPU only: how many of those blocks a training step runs side by side (more memory; 1 = one
    # after another; 0 = auto: 2 for models up to ViT-B's width, else 1). Evaluation takes one.
    c.cpu_blocks_at_once = 0
    c.seed = 0
    c.log_every = 50
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2
    c.keep_best = ""  # 'accuracy' or 'loss': also keep (and export) the best evaluated checkpoint
    c.early_stop_patience = 0  # stop after N evaluations without improvement; 0 = never
    c.export_npz = True  # write {workdir}/model.npz (published layout) at the end
    c.progress = True
    return c


def preset(dataset: str, arg: str | None = None, **overrides: Any) -> ml_collections.ConfigDict:
    """A config for `dataset`; `arg` is 'MODEL[,runlocal]' (runlocal: tiny model, few steps)."""
    c = default_config()
    c.dataset = dataset
    parts = [p for p in (arg or "").split(",") if p]
    for part in parts:
        if part != "runlocal" and part not in models.VARIANTS:
            raise ValueError(
                f"{part!r} is neither a model nor 'runlocal' (the preset's argument is "
                f"MODEL[,runlocal]; models: {', '.join(models.VARIANTS)})"
            )
        if part != "runlocal":
            c.model = part
    for key, value in overrides.items():
        c[key] = value
    if "runlocal" in parts:
        c.model = "testing"
        c.from_scratch = True
        c.total_steps, c.warmup_steps, c.batch, c.batch_eval, c.accum_steps = 20, 2, 16, 16, 1
        c.image_size, c.shuffle_buffer, c.log_every, c.eval_every = 32, 256, 5, 10
        c.checkpoint_every = 10
    return c


_TRAIN_CLASSIFIERS = ("token", "gap")  # the others keep one output per token


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises TrainingError naming the first bad value (checked in order, so each check may rely on
    the ones before it, e.g. divisibility on accum_steps >= 1)."""

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise TrainingError(message)

    require(
        config.model in models.VARIANTS,
        f"unknown model {config.model!r}; known models: {', '.join(models.VARIANTS)}",
    )
    variant = models.VARIANTS[config.model]
    classifier = config.model_overrides.get("classifier", variant.get("classifier", "token"))
    require(
        classifier in _TRAIN_CLASSIFIERS,
        f"classifier={classifier!r}: training needs one output per image: use token or gap",
    )
    size = config.image_size
    sizes = [size] if isinstance(size, int) else list(size)
    require(
        len(sizes) in (1, 2) and all(isinstance(s, int) and s > 0 for s in sizes),
        f"image_size={size!r}: use a positive number of pixels, or (height, width)",
    )
    lo, hi = config.crop_area
    require(0 < lo <= hi <= 1, f"crop_area={tuple(config.crop_area)}: use 0 < min <= max <= 1")
    for name in ("batch", "batch_eval", "accum_steps", "total_steps", "shuffle_buffer"):
        require(config[name] >= 1, f"{name}={config[name]} must be >= 1")
    for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        require(config[name] >= 1, f"{name}={config[name]} must be >= 1")
    for name in ("warmup_steps", "base_lr", "weight_decay", "early_stop_patience"):
        require(config[name] >= 0, f"{name}={config[name]} must be >= 0")
    require(
        config.grad_norm_clip >= 0, f"grad_norm_clip={config.grad_norm_clip} must be >= 0 (0 = off)"
    )
    require(
        not (config.from_scratch and config.pretrained),
        f"from_scratch=True would ignore pretrained={config.pretrained!r}: drop one (a preset "
        "that trains from scratch, such as configs/digits.py, starts from a checkpoint with "
        "--nofrom_scratch)",
    )
    require(0 <= config.momentum < 1, f"momentum={config.momentum} must be in [0, 1)")
    require(
        0 <= config.test_fraction < 1,
        f"test_fraction={config.test_fraction} must be in [0, 1) (0 = the folder's own test/)",
    )
    require(
        config.cpu_block_tokens >= 0,
        f"cpu_block_tokens={config.cpu_block_tokens} must be >= 0 (0 turns blocking off)",
    )
    require(
        config.cpu_blocks_at_once >= 0,
        f"cpu_blocks_at_once={config.cpu_blocks_at_once} must be >= 0 (0 = auto, 1 = one at a time)",
    )
    require(
        config.decay_type in ("cosine", "linear"),
        f"decay_type={config.decay_type!r}: use cosine or linear",
    )
    require(
        config.optimizer in ("sgd", "adamw"), f"optimizer={config.optimizer!r}: use sgd or adamw"
    )
    require(
        config.dtype in ("auto", "float32", "bfloat16"),
        f"dtype={config.dtype!r}: use auto, float32 or bfloat16",
    )
    require(
        config.attention in models.ATTENTION,
        f"attention={config.attention!r}: use {', '.join(models.ATTENTION)}",
    )
    require(
        config.momentum_dtype in ("float32", "bfloat16"),
        f"momentum_dtype={config.momentum_dtype!r}: use float32 or bfloat16",
    )
    require(
        config.keep_best in ("", "accuracy", "loss"),
        f"keep_best={config.keep_best!r}: use accuracy or loss",
    )
    require(
        config.batch % config.accum_steps == 0,
        f"batch {config.batch} is not divisible by accum_steps={config.accum_steps} (the "
        f"micro-batches a step sums); choose a batch that is a multiple of {config.accum_steps}, "
        f"or an accum_steps that divides {config.batch}",
    )
    micro = config.batch // config.accum_steps
    require(
        micro % num_devices == 0,
        f"micro-batch {micro} (batch {config.batch} / accum_steps {config.accum_steps}) is not "
        f"divisible by {num_devices} devices; choose a batch that is",
    )
    require(
        config.batch_eval % num_devices == 0,
        f"batch_eval {config.batch_eval} is not divisible by {num_devices} devices; choose a "
        f"batch_eval that is",
    )


# ----------------------------------------------------------------------------- optimisation


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to base_lr, then cosine or linear decay to 0 at total_steps."""
    decay_steps = max(config.total_steps - config.warmup_steps, 1)
    if config.decay_type == "cosine":
        decay = optax.cosine_decay_schedule(config.base_lr, decay_steps)
    else:
        decay = optax.linear_schedule(config.base_lr, 0.0, decay_steps)
    if config.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, config.base_lr, config.warmup_steps)
    return optax.join_schedules([warmup, decay], [config.warmup_steps])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    schedule = make_schedule(config)
    moment_dtype = jnp.dtype(config.momentum_dtype)
    parts = [optax.clip_by_global_norm(config.grad_norm_clip)] if config.grad_norm_clip else []
    if config.optimizer == "sgd":
        if config.weight_decay:
            parts.append(optax.add_decayed_weights(config.weight_decay))
        parts.append(optax.sgd(schedule, momentum=config.momentum, accumulator_dtype=moment_dtype))
    else:
        parts.append(
            optax.adamw(
                schedule,
                b1=config.momentum,
                weight_decay=config.weight_decay,
                mu_dtype=moment_dtype,
            )
        )
    return optax.chain(*parts)


def initial_state(params: Any, tx: optax.GradientTransformation) -> dict[str, Any]:
    """The training state `make_train_step` updates: step 0, params, fresh optimizer state."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of (B, C) logits against (B,) integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels
    ).mean()


def micro_batches(model, config, image_shape: Sequence[int], num_devices: int) -> int:
    """Micro-batches per training step for a global batch of NHWC `image_shape`: `accum_steps`, each
    cut on CPU into `parallel.cpu_blocks` of at most `cpu_block_tokens` tokens per device."""
    accum = config.accum_steps
    micro_shape = (image_shape[0] // accum, *image_shape[1:])
    return accum * parallel.model_blocks(model, micro_shape, num_devices, config.cpu_block_tokens)


def blocks_side_by_side(model, config, image_shape: Sequence[int], num_devices: int) -> int:
    """How many of `micro_batches(...)` a training step computes at a time: CPU cache blocks
    `parallel.train_blocks_at_once` side by side, never micro-batches of `accum_steps` alone (two
    at once would double the memory that accumulation is there to save)."""
    blocks = micro_batches(model, config, image_shape, num_devices) // config.accum_steps
    return parallel.blocks_at_once(
        blocks, parallel.train_blocks_at_once(model.hidden_size, config.cpu_blocks_at_once)
    )


def memory_tips(
    model,
    config,
    image_shape: Sequence[int],
    num_devices: int,
    platform: str,
    memory: Any = None,
    limit_gib: float | None = None,
) -> list[str]:
    """Settings that shrink a training step's memory for a global NHWC batch of `image_shape`, the
    ones that leave the updates as they are first, each with what it costs. With the step's
    `memory` (`compiled.memory_analysis()`) and the device's `limit_gib`, `--accum_steps` is the
    smallest whose micro-batch fits 90 % of the device by XLA's temporaries scaled to its size."""
    tips = []
    per_device = image_shape[0] // config.accum_steps // num_devices
    if platform == "cpu" and config.cpu_block_tokens == 0:
        tips.append(
            f"--cpu_block_tokens {parallel.CPU_BLOCK_TOKENS} (CPU cache blocks, the default)"
        )
    elif platform == "cpu":
        blocks = micro_batches(model, config, image_shape, num_devices) // config.accum_steps
        if blocks_side_by_side(model, config, image_shape, num_devices) > 1:
            tips.append("--cpu_blocks_at_once 1 (a few per cent slower)")
        rows = per_device // blocks
        if rows > 1:
            tokens = model.num_tokens(tuple(image_shape[1:3])) * (rows // 2)
            tips.append(f"--cpu_block_tokens {tokens} (blocks of {rows // 2} images, not {rows})")
    else:
        batch = image_shape[0]
        larger = [
            a
            for a in range(config.accum_steps + 1, batch // num_devices + 1)
            if batch % a == 0 and batch // a % num_devices == 0
        ]
        fits, per_image = None, 0.0
        if memory is not None and limit_gib:
            room = 0.9 * limit_gib * 2**30 - memory.argument_size_in_bytes
            per_image = memory.temp_size_in_bytes / per_device
            fits = next(
                (a for a in larger if per_image * (batch // a // num_devices) <= room), None
            )
        accum = fits or (larger[0] if larger else None)
        if accum is not None:
            micro = batch // accum // num_devices
            estimate = f", about {per_image * micro / 2**30:.1f} GiB of temporaries" if fits else ""
            tips.append(
                f"--accum_steps {accum} (micro-batches of {micro} images per device, not "
                f"{per_device}{estimate}; the same updates)"
            )
    if not config.remat:
        tips.append("--remat (each block's activations recomputed: about 1/3 more compute)")
    if config.dtype == "float32" and platform != "cpu":
        tips.append("--dtype bfloat16")
    if num_devices > 1 and not config.shard_params:
        tips.append("--shard_params (parameters and optimizer state split over the devices)")
    tips.append("a smaller --batch or --image_size")
    return tips


def memory_figures(memory: Any) -> str:
    """XLA's per-device buffers of a compiled program (`compiled.memory_analysis()`), e.g. '61.2 MiB
    of state and batch and 0.33 GiB of temporaries per device'."""

    return (
        f"{byte_size(memory.argument_size_in_bytes)} of state and batch and "
        f"{byte_size(memory.temp_size_in_bytes)} of temporaries per device"
    )


def make_train_step(model, tx, config, mesh, state_sharding: Any = None):
    """The pure update `(state, batch) -> (state, metrics)`, jitted with the state donated.

    The batch is split into `micro_batches(...)` interleaved micro-batches (rows i, i+k, ...): the
    `accum_steps` asked for, times the CPU cache blocks (`blocks_side_by_side` of those computed at
    a time). Each device's shard holds its part of every micro-batch; gradients are averaged
    over them, so the update is the whole batch's. Dropout keys are `fold_in(key(seed), step)` (and
    the micro-batch index): they do not depend on the device count.
    `state_sharding` (a tree like the state) pins where the updated state lives, e.g. FSDP shards.
    """
    num_devices = mesh.devices.size
    base_key = jax.random.key(config.seed)
    data_sharding = NamedSharding(mesh, P("data"))

    def loss_fn(params, images, labels, key, weight=1.0):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
        return cross_entropy(logits, labels) * weight

    grad_fn = jax.value_and_grad(loss_fn)

    def step_fn(state, batch):
        params = state["params"]
        key = jax.random.fold_in(base_key, state["step"])
        accum = micro_batches(model, config, batch["image"].shape, num_devices)
        at_once = blocks_side_by_side(model, config, batch["image"].shape, num_devices)
        if accum == 1:
            loss, grads = grad_fn(params, batch["image"], batch["label"], key)
        else:
            # Each micro-batch is read in place in the loop, not copied out of the batch first.
            rows = {k: parallel.strided_rows(batch[k], accum) for k in ("image", "label")}

            def block(name, i):
                x = parallel.rows_block(rows[name], i)
                return jax.lax.with_sharding_constraint(x, data_sharding)

            # Each micro-batch's loss is weighted by 1/accum, so the sum of their gradients is the
            # mean without another pass over every gradient afterwards.
            def body(carry, i):
                images, labels = block("image", i), block("label", i)
                key_i = jax.random.fold_in(key, i)
                loss, grads = grad_fn(params, images, labels, key_i, 1.0 / accum)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(body, zero, jnp.arange(accum), unroll=at_once)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
        }
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    if state_sharding is None:
        return jax.jit(step_fn, donate_argnums=(0,))
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        step_fn,
        donate_argnums=(0,),
        out_shardings=(state_sharding, {"loss": replicated, "grad_norm": replicated}),
    )


def make_eval_step(model, cpu_block_tokens: int | None = None):
    """`(params, batch) -> (predicted class, loss)` per example, jitted; on CPU in blocks of at most
    `cpu_block_tokens` tokens per device (see `parallel.cpu_blocks`; None:
    `parallel.inference_block_tokens()`), one after another."""

    def eval_step(params, batch):
        logits = parallel.apply_in_blocks(
            model, params, batch["image"], jax.device_count(), cpu_block_tokens
        )
        losses = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["label"]
        )
        return jnp.argmax(logits, axis=-1), losses

    return jax.jit(eval_step)


# ----------------------------------------------------------------------------- evaluation


def evaluate(eval_step, params, batches: Iterator, sharding, num_classes: int) -> dict[str, Any]:
    """Accuracy, loss, per-class precision/recall/F1 and the confusion matrix over every example."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    preds, labels, losses = [], [], []
    for batch in batches:
        mask = batch.pop("mask").astype(bool)
        device_batch = to_device(batch, sharding)
        pred, loss = eval_step(params, device_batch)
        pred, loss = _gather(pred), _gather(loss)
        label, mask = _gather(batch["label"]), _gather(mask)
        preds.append(pred[mask])
        labels.append(label[mask])
        losses.append(loss[mask])
    y_pred, y_true = np.concatenate(preds), np.concatenate(labels)
    classes = list(range(num_classes))
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0
    )
    support = np.bincount(y_true, minlength=num_classes)  # sklearn's is float in some cases
    return {
        "accuracy": float(np.mean(y_pred == y_true)),
        "test_loss": float(np.mean(np.concatenate(losses))),
        "num_examples": len(y_true),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": support.tolist(),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
    }


def _gather(x: jax.Array | np.ndarray) -> np.ndarray:
    """A global array, or each process's host rows, as one host array of all rows."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


REPORT_CLASSES = 20  # rows of the per-class table printed at the end of a run


def format_report(
    metrics: dict[str, Any], class_names: list[str], max_classes: int | None = None
) -> str:
    """The evaluation as a printable table: accuracy, macro averages, one row per class.

    The macro averages are over the classes that have test examples (a class without any has no
    recall; the images wrongly given its name already lower the others' recall). With more than
    `max_classes` classes only the `max_classes` rows with the lowest F1 among the classes that
    have test examples are listed (ImageNet's 1000 rows would bury the rest of the log). The
    confusion matrix is printed for up to 20 classes; eval.json holds it for any number.
    """
    n = len(class_names)
    width = max(8, *(len(name) for name in class_names)) + 2
    present = np.asarray(metrics["support"]) > 0
    present = present if present.any() else ~present
    macro = {
        k: float(np.mean(np.asarray(metrics[k])[present])) for k in ("precision", "recall", "f1")
    }
    over = f"{n} classes" if present.all() else f"the {present.sum()} of {n} classes with examples"
    lines = [
        f"test accuracy {metrics['accuracy']:.4f} on {metrics['num_examples']} examples "
        f"(loss {metrics['test_loss']:.4f}); macro precision {macro['precision']:.3f}, "
        f"recall {macro['recall']:.3f}, f1 {macro['f1']:.3f} over {over}",
    ]
    rows = list(range(n))
    if max_classes is not None and n > max_classes:
        # Classes without test examples have f1 0 by convention and say nothing: listed last.
        key = lambda i: (metrics["support"][i] == 0, metrics["f1"][i], i)
        rows = sorted(rows, key=key)[:max_classes]
        lines.append(f"the {max_classes} classes with the lowest f1 (all {n} in report.txt):")
    lines.append(f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
    for i in rows:
        lines.append(
            f"{class_names[i]:<{width}}{metrics['precision'][i]:>10.3f}"
            f"{metrics['recall'][i]:>10.3f}{metrics['f1'][i]:>10.3f}{metrics['support'][i]:>9d}"
        )
    if n <= 20:
        lines.append("confusion matrix (rows: true class, columns: predicted):")
        lines += [" ".join(f"{v:4d}" for v in row) for row in metrics["confusion_matrix"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plumbing


def prefetch(
    iterator: Iterator, sharding: NamedSharding, size: int = 2, stop_timeout_s: float = 10.0
) -> Iterator:
    """Moves batches to the devices in a background thread, `size` ahead of the training loop.

    Closing the returned generator (`.close()`, or its garbage collection) stops the thread: it
    finishes the batch it is on (waiting at most `stop_timeout_s`) and the source iterator is closed.
    A thread left running holds the input pipeline and `size` device batches (in a notebook, until
    the kernel restarts), and one still inside TensorFlow or JAX when the interpreter exits can
    abort the process ("FATAL: exception not rethrown").
    """
    import queue

    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def worker() -> None:
        try:
            for batch in iterator:
                if not put(to_device(batch, sharding)):
                    return
        except BaseException as e:  # surfaced in the consumer
            put(e)
            return
        put(done)

    thread = threading.Thread(target=worker, name="vit_jax-prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(stop_timeout_s)
        close = getattr(iterator, "close", None)
        if close is not None and not thread.is_alive():
            close()


def _json_row(line: str) -> dict[str, Any] | None:
    """A metrics.jsonl line as a dict; None for a blank line or one cut short (a process killed
    while appending it: the resumed run rewrites the file without it)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and "step" in row else None


class MetricWriter:
    """metrics.jsonl + TensorBoard event files in the run directory (process 0 only)."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.rows: list[dict[str, Any]] = []
        if self.active:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(workdir)
            if os.path.exists(self.path):
                with open(self.path) as f:
                    self.rows = [row for line in f if (row := _json_row(line)) is not None]

    def write(self, row: dict[str, Any]) -> None:
        if not self.active:
            return
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, row["step"])
        self.tb.flush()

    def truncate_after(self, step: int) -> None:
        """On resume: forget rows logged after the checkpoint we restart from."""
        if not self.active:
            return
        self.rows = [r for r in self.rows if r["step"] <= step]
        with atomic_path(self.path) as tmp, open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)

    def plot(self, path: str) -> None:
        if not self.active or not self.rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        train = [r for r in self.rows if "train_loss" in r]
        ax1.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train loss")
        evals = [r for r in self.rows if "accuracy" in r]
        if evals:
            ax1.plot(
                [r["step"] for r in evals], [r["test_loss"] for r in evals], "o-", label="test loss"
            )
            ax2.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", color="C2")
        ax1.set(xlabel="step", ylabel="loss", title="loss")
        ax1.legend()
        ax2.set(xlabel="step", ylabel="accuracy", title="test accuracy", ylim=(0, 1))
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.active:
            self.tb.close()


class Progress:
    """The best evaluation so far and the evaluations since, for --keep_best / --early_stop_patience.

    Saved inside every orbax checkpoint (so a resumed run, on every process, continues the count).
    The watched metric is `keep_best` ('accuracy', higher is better, or 'loss', lower), else accuracy.
    """

    def __init__(self, config: ml_collections.ConfigDict, saved: dict[str, Any] | None = None):
        self.metric = config.keep_best or "accuracy"
        self.patience = config.early_stop_patience
        saved = saved or {}
        self.best_step: int | None = saved.get("best_step")
        self.best_value: float | None = saved.get("best_value")
        self.evals_since_best: int = saved.get("evals_since_best", 0)

    def update(self, step: int, metrics: dict[str, Any]) -> bool:
        """Records an evaluation; True if it is the best so far."""
        value = float(metrics["accuracy" if self.metric == "accuracy" else "test_loss"])
        better = self.best_value is None or (
            value > self.best_value if self.metric == "accuracy" else value < self.best_value
        )
        if better:
            self.best_step, self.best_value, self.evals_since_best = step, value, 0
        else:
            self.evals_since_best += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evals_since_best >= self.patience

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "best_step": self.best_step,
            "best_value": self.best_value,
            "evals_since_best": self.evals_since_best,
        }


def pretrained_path(config: ml_collections.ConfigDict) -> str:
    if config.pretrained:
        return config.pretrained
    return os.path.join(os.path.expanduser(config.vit_pretrained_dir), f"{config.model}.npz")


# ----------------------------------------------------------------------------- the job


def checkpoint_manager(directory: str, item: str, **options: Any) -> Any:
    """An orbax `CheckpointManager` for `directory` whose `item` is a pytree of arrays (saved with
    `ocp.args.PyTreeSave`, restored with `restore_args`), beside an optional JSON `progress` item.
    `options`: `ocp.CheckpointManagerOptions` fields.

    Saves are synchronous: one finishes (written, then renamed from its tmp directory) before the next
    step donates the state's buffers, so a crash mid-save leaves the earlier checkpoints intact.
    In a single process, replicated arrays are written whole, each from one device. Orbax's default,
    replica-parallel saving, has every device write a slice of each replicated array: one compiled
    slice per array shape and device, and a dispatch per array and device at every save, for nothing
    when one process writes all the slices anyway (ViT-B/16 params and momentum on 4 CPU devices:
    first save 2.9-4.0 -> 0.84-0.88 s, later ones 1.1-1.5 -> 0.63-0.95 s). With several processes
    orbax's default stays, as it spreads the writing of replicated arrays over the hosts.
    """
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers as th

    if jax.process_count() == 1:
        scalar = th.ScalarHandler()
        types = th.create_type_handler_registry(
            *((t, scalar) for t in (int, float, np.number)),
            (np.ndarray, th.NumpyHandler()),
            (jax.Array, th.ArrayHandler(use_replica_parallel=False)),
        )
        handler = ocp.PyTreeCheckpointHandler(type_handler_registry=types)
    else:
        handler = ocp.PyTreeCheckpointHandler()
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(item, ocp.args.PyTreeSave, handler)
    registry.add(item, ocp.args.PyTreeRestore, handler)
    json_handler = ocp.JsonCheckpointHandler()
    registry.add("progress", ocp.args.JsonSave, json_handler)
    registry.add("progress", ocp.args.JsonRestore, json_handler)
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False, **options)
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


def restore_args(target: Any) -> Any:
    """`ocp.args.PyTreeRestore` of a `checkpoint_manager` item into `target`'s structure, shapes,
    dtypes and shardings (a pytree of `jax.ShapeDtypeStruct` with shardings)."""
    import orbax.checkpoint as ocp

    return ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
    )


def _check_resumable(state_dir: str, target: Any) -> None:
    """ValueError naming the first arrays whose saved shapes (or presence) differ from `target`'s,
    read from the checkpoint's metadata before orbax starts reading any array."""
    import pathlib

    import orbax.checkpoint as ocp

    def names(tree: Any) -> dict[str, tuple[int, ...]]:
        # The metadata has dict keys where the state has namedtuple fields: compare by name.
        return {
            jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        }

    saved = names(ocp.StandardCheckpointHandler().metadata(pathlib.Path(state_dir)))
    wanted = names(target)
    if set(saved) != set(wanted):
        only = sorted(set(saved) ^ set(wanted))[:3]
        raise ValueError(f"the saved state holds other arrays, e.g. {', '.join(only)}")
    differ = [f"{k}: saved {saved[k]}, now {wanted[k]}" for k in wanted if saved[k] != wanted[k]]
    if differ:
        raise ValueError("; ".join(differ[:3]))


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Holds back Ctrl-C (SIGINT) until the block ends: a checkpoint save cut short leaves a
    half-written step and orbax threads that fail noisily at exit. Main thread only."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} of a nested dict such as a config read from JSON (an empty dict: no keys)."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def record_config(config: ml_collections.ConfigDict, workdir: str, resumed_at: int | None) -> str:
    """Writes the run's settings to {workdir}/config.json (process 0). When a resumed run's
    settings differ from those it last ran with, the earlier file is kept as config-{resumed_at}.json
    and the returned line names each change ('' otherwise)."""
    if jax.process_index() != 0:
        return ""
    current = json.loads(config.to_json_best_effort())  # values JSON lacks become strings
    path = os.path.join(workdir, "config.json")
    note = ""
    if resumed_at is not None and os.path.exists(path):
        try:
            with open(path) as f:
                before = _flat(json.load(f))
        except (OSError, ValueError):  # unreadable: replaced below
            before = None
        if before is not None:
            after = _flat(current)
            unset = object()

            def shown(value: Any) -> str:
                return "(unset)" if value is unset else json.dumps(value)

            changes = [
                f"{key} {shown(before.get(key, unset))} -> {shown(after.get(key, unset))}"
                for key in sorted(set(before) | set(after))
                if before.get(key, unset) != after.get(key, unset)
            ]
            if not changes:
                return ""
            kept = os.path.join(workdir, f"config-{resumed_at}.json")
            os.replace(path, kept)
            note = (
                f"settings changed since step {resumed_at} (kept in {os.path.basename(kept)}): "
                + ", ".join(changes)
            )
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(current, f, indent=2)
        f.write("\n")
    return note


def write_labels(class_names: list[str], workdir: str) -> None:
    """Writes {workdir}/labels.txt, the class names in label order, one per line (process 0): what
    `predict`/`visualize` name the classes by, from the start of the run (`--labels` reads it too)."""
    if jax.process_index() != 0:
        return
    with atomic_path(os.path.join(workdir, "labels.txt")) as tmp, open(tmp, "w") as f:
        f.writelines(" ".join(name.split()) + "\n" for name in class_names)


def _expand_user(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy with '~' expanded in the paths read directly (the shell leaves `--dataset=~/x`
    alone; the checkpoint paths are expanded where they are opened), and those paths absolute, so
    that config.json names the same folders from any working directory (`vit_jax.evaluate`)."""
    config = copy.deepcopy(config)
    for name in ("dataset", "tfds_data_dir", "tfds_manual_dir"):
        if config[name].startswith("~"):
            config[name] = os.path.expanduser(config[name])
        if config[name] and (name != "dataset" or os.path.isdir(config[name])):
            config[name] = os.path.abspath(config[name])
    return config


def _check_workdir_outside_images(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses a run directory inside the folders an image-folder dataset reads images from, so
    that runs and data stay apart. (Scans leave run directories out, as they do those of runs
    made on other data, but a flat folder's `runs/` would be listed as a folder in every log.)"""
    if not os.path.isdir(config.dataset):
        return
    real = os.path.realpath(workdir)
    for directory in input_pipeline.folder_dirs(config.dataset):
        if directory is None:
            continue
        top = os.path.realpath(directory)
        if real == top or real.startswith(top + os.sep):
            where = (
                f"the image folder {directory}, whose sub-folders are classes"
                if top == os.path.realpath(config.dataset)
                else f"{directory}, a split of the image folder {config.dataset}"
            )
            raise TrainingError(
                f"the run directory {workdir} is inside {where}: keep runs apart from the "
                "images they train on; choose a --logdir or --workdir outside it"
            )


def _host_memory_shortfall(memory: Any, device: Any) -> str | None:
    """`host_memory_shortfall` of the training step on this process's host, or, with several
    processes on CPU, of another's: every process stops before the first step, not only the one
    whose host is short (the others would wait for it in the step's collectives)."""
    short = host_memory_shortfall(memory, device)
    if jax.process_count() == 1 or device.platform != "cpu":
        return short
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.int32(short is not None)))
    if short is None and flags.any():
        short = f"process {int(np.argmax(flags))}'s host has too little memory left for the step"
    return short


def _prepare_data(config: ml_collections.ConfigDict) -> input_pipeline.DatasetInfo:
    """`get_info(config, download=True)`. With several processes, process 0 downloads and prepares
    a TFDS dataset first and the others follow: on a shared --tfds_data_dir they find it ready
    (all at once they would download and write the same files); on local disks each prepares its
    own. A failure on process 0 stops every process with one error."""
    if jax.process_count() == 1 or input_pipeline.get_info(config).source != "tfds":
        return input_pipeline.get_info(config, download=True)
    from jax.experimental import multihost_utils

    info, error = None, None
    if jax.process_index() == 0:
        try:
            info = input_pipeline.get_info(config, download=True)
        except input_pipeline.DataError as e:
            error = e
    ready = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if error is not None:
        raise error
    if not ready:
        raise input_pipeline.DataError(
            f"process 0 could not prepare the TFDS dataset {config.dataset!r} (its error says why)"
        )
    return info if info is not None else input_pipeline.get_info(config, download=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Fine-tunes (or trains from scratch) and evaluates; resumes from `workdir` if it has checkpoints.

    Returns the final evaluation (accuracy, loss, per-class precision/recall/F1, confusion matrix,
    number of examples), `step` (the last one trained), `micro_batches` (per update: `accum_steps`
    times the CPU cache blocks, see `micro_batches`), `stopped_early` and, with `keep_best`, `best`
    ({'step', 'metric', 'value'}). Writes to `workdir`: config.json (see `record_config`),
    labels.txt (the class names), checkpoints/, metrics.jsonl, TensorBoard events, curves.png,
    eval.json, report.txt (the per-class table) and (with `export_npz`) model.npz in the published
    layout; with `keep_best` also best/ (the best checkpoint's params) and best.npz.
    """
    import orbax.checkpoint as ocp

    devices = jax.devices()
    validate(config, len(devices))
    mesh = data_mesh(devices)
    data_sharding = NamedSharding(mesh, P("data"))
    config = _expand_user(config)
    if config.dtype == "auto":
        config.dtype = models.default_compute_dtype().name
    workdir = os.path.abspath(os.path.expanduser(workdir))
    _check_workdir_outside_images(config, workdir)

    info = _prepare_data(config)
    overrides = config.model_overrides.to_dict()
    try:  # an unknown model_overrides field, an image size the patch size does not divide
        model = models.get_model(
            config.model,
            num_classes=info.num_classes,
            dtype=jnp.dtype(config.dtype),
            **{"remat": config.remat, "attention": config.attention, **overrides},
        )
        hw = models.image_hw(config.image_size)
        grid = model.grid_size(hw)
        attention = model.attention_path()
    except ValueError as e:
        raise TrainingError(str(e)) from None
    resuming = bool(checkpoint.saved_steps(os.path.join(workdir, "checkpoints")))
    tx = make_optimizer(config)
    log = print if jax.process_index() == 0 else (lambda *a, **k: None)

    def init_params(key):
        return model.init(key, jnp.zeros((1, *hw, 3), jnp.float32), train=False)["params"]

    abstract = jax.eval_shape(lambda: initial_state(init_params(jax.random.key(0)), tx))
    shardings = parallel.state_shardings(abstract, mesh, config.shard_params)
    # What a restore produces: the state's shapes and dtypes, placed as training places them.
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )

    def fresh_params() -> Any:
        """Initialised params, or the pretrained checkpoint's adapted to the model."""
        params = jax.jit(init_params, out_shardings=shardings["params"])(
            jax.random.key(config.seed)
        )
        if config.from_scratch:
            return params
        path = pretrained_path(config)
        try:
            loaded = checkpoint.load_pretrained(
                pretrained_path=path,
                init_params=parallel.to_host(params),
                model_config=model,
                grid_size=grid,
            )
        except checkpoint.CheckpointError as e:
            raise TrainingError(f"{e}\nOr train from random weights with --from_scratch.") from None
        log(f"initialised from {path}")
        return parallel.put(loaded, shardings["params"])

    # A new run reads its checkpoint first: one that cannot be used stops it before it writes.
    params = None if resuming else fresh_params()
    os.makedirs(workdir, exist_ok=True)  # only once the configuration has been checked
    manager = checkpoint_manager(
        os.path.join(workdir, "checkpoints"),
        "state",
        max_to_keep=config.keep_checkpoints,
        cleanup_tmp_directories=True,
    )
    best_manager = (
        checkpoint_manager(os.path.join(workdir, "best"), "params", max_to_keep=1)
        if config.keep_best
        else None
    )
    start = manager.latest_step()
    progress = Progress(config)

    if start is not None:
        items = {"state": restore_args(target)}
        if os.path.isdir(os.path.join(workdir, "checkpoints", str(start), "progress")):
            items["progress"] = ocp.args.JsonRestore()
        state_dir = os.path.join(workdir, "checkpoints", str(start), "state")
        try:
            _check_resumable(state_dir, target)
            restored = manager.restore(start, args=ocp.args.Composite(**items))
        except ValueError as e:  # other shapes or another optimizer's state
            raise TrainingError(
                f"{workdir} holds the checkpoint of a run with other settings (step {start}: "
                f"{first_line(e)}); a run resumes only with the model, number of classes, image "
                "size and optimizer it started with. Give a new run its own --name (a run directory is reused when "
                "--name is left out and an unfinished run of the same model and dataset exists)."
            ) from None
        state = restored["state"]
        progress = Progress(config, restored.get("progress"))
        log(f"resumed from {workdir}/checkpoints/{start}")
        if best_manager is not None:  # a best saved after `start` will be found again
            for stale in [s for s in best_manager.all_steps() if s > start]:
                best_manager.delete(stale)
    else:
        params = fresh_params() if params is None else params
        state = jax.jit(lambda p: initial_state(p, tx), out_shardings=shardings)(params)
        start = 0
    del params  # the state holds them (and a step donates its buffers)

    train_step = make_train_step(model, tx, config, mesh, shardings)
    eval_step = make_eval_step(model, parallel.inference_block_tokens(config.cpu_block_tokens))
    # The logged learning rate: one compiled program instead of ~10 eager ops each compiled (0.5 s).
    schedule = jax.jit(make_schedule(config))
    writer = MetricWriter(workdir)
    writer.truncate_after(start)
    if note := record_config(config, workdir, start if resuming else None):
        log(note)
    write_labels(info.class_names, workdir)
    num_devices = len(devices)
    local_batch = config.batch // jax.process_count()
    local_eval = config.batch_eval // jax.process_count()

    def run_eval():
        batches = input_pipeline.eval_batches(
            config, info, local_eval, jax.process_index(), jax.process_count()
        )
        return evaluate(eval_step, state["params"], batches, data_sharding, info.num_classes)

    batches = prefetch(
        input_pipeline.train_batches(
            config, info, local_batch, start, jax.process_index(), jax.process_count()
        ),
        data_sharding,
    )
    model_name = config.model + (f" with {overrides}" if overrides else "")
    micro = micro_batches(model, config, (config.batch, *hw, 3), num_devices)
    at_once = blocks_side_by_side(model, config, (config.batch, *hw, 3), num_devices)
    log(
        f"{model_name} ({models.count_params(model, hw):,} params) on {info.name} "
        f"({info.num_classes} classes) at {hw[0]}x{hw[1]}, {num_devices} {devices[0].platform} "
        f"device(s) in {config.dtype} ({attention} attention), batch {config.batch} ({micro} "
        f"micro-batches{f', {at_once} at a time' if at_once > 1 else ''}), steps "
        f"{start}->{config.total_steps}, run directory {workdir}"
    )
    for note in input_pipeline.data_notes(info, "train") + input_pipeline.data_notes(info, "test"):
        log(note)

    import tqdm

    bar = tqdm.tqdm(
        total=config.total_steps,
        initial=start,
        disable=not config.progress or jax.process_index() != 0,
        unit="step",
        dynamic_ncols=True,
    )
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    tick, tick_step = time.perf_counter(), start
    eval_metrics: dict[str, Any] = {}

    def flush(step: int) -> dict[str, Any]:
        """Pulls pending metrics to the host; stops the run on a NaN/Inf loss."""
        nonlocal tick, tick_step
        host = [(s, jax.device_get(m)) for s, m in pending]
        pending.clear()
        for s, m in host:
            bad = {k: float(m[k]) for k in ("loss", "grad_norm") if not math.isfinite(float(m[k]))}
            if bad:
                what = " and ".join(
                    f"{'training loss' if k == 'loss' else 'gradient norm'} became {v}"
                    for k, v in bad.items()
                )
                last_good = manager.latest_step()
                kept = (
                    f"The last good checkpoint is step {last_good} in {workdir}/checkpoints (kept as "
                    "it was)."
                    if last_good is not None
                    else "No checkpoint had been written yet."
                )
                raise TrainingError(
                    f"the {what} at step {s}; stopped. {kept} Lower --base_lr, raise "
                    "--warmup_steps or check --grad_norm_clip, then rerun."
                )
        now = time.perf_counter()
        img_sec_core = (step - tick_step) * config.batch / max(now - tick, 1e-9) / num_devices
        tick, tick_step = now, step
        loss = float(np.mean([float(m["loss"]) for _, m in host])) if host else float("nan")
        return {
            "step": step,
            "train_loss": loss,
            "learning_rate": float(schedule(step - 1)),
            "img_sec_core": img_sec_core,
            "grad_norm": float(host[-1][1]["grad_norm"]) if host else float("nan"),
        }

    def save(step: int) -> None:
        with _interrupt_after():
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeSave(state),
                    progress=ocp.args.JsonSave(progress.to_dict()),
                ),
            )

    step_memory = None  # XLA's buffers of the compiled training step, for the log and errors

    def memory_error(error: BaseException) -> TrainingError:
        """The TrainingError for an out-of-memory `error` in the training step."""
        shape = (config.batch, *hw, 3)
        limit = device_memory_gib(devices[0])
        platform = devices[0].platform
        tips = memory_tips(model, config, shape, num_devices, platform, step_memory, limit)
        latest = manager.latest_step()
        kept = (
            f"Rerun with the same run directory to resume from step {latest}."
            if latest is not None
            else "No checkpoint had been written yet."
        )
        micro = config.batch // config.accum_steps // num_devices
        needs = f" need {memory_figures(step_memory)}" if step_memory is not None else ""
        return TrainingError(
            f"out of memory in the training step ({first_line(error)[:200]}): micro-batches of "
            f"{micro} images per device at {hw[0]}x{hw[1]}{needs}"
            f"{device_memory_note(devices[0])}. To fit, try {'; '.join(tips)}. {kept}"
        )

    def evaluate_at(step: int, row: dict[str, Any] | None = None) -> dict[str, Any]:
        """`run_eval()` at `step`. One that runs out of memory keeps the step first (its training
        metrics `row` in metrics.jsonl, its checkpoint), then asks for a smaller batch_eval."""
        try:
            return run_eval()
        except jax.errors.JaxRuntimeError as e:
            if not out_of_memory(e):
                raise
            if row is not None:
                writer.write(row)
            if step not in manager.all_steps():
                save(step)
            raise TrainingError(
                f"out of memory evaluating at step {step} ({first_line(e)[:200]}): batches of "
                f"{config.batch_eval} images at {hw[0]}x{hw[1]} over {num_devices} device(s)"
                f"{device_memory_note(devices[0])}. Step {step} is saved: rerun with the same run "
                f"directory and a smaller --batch_eval (a multiple of {num_devices}) to resume "
                "there."
            ) from None

    last_step = start
    stopped_early = progress.should_stop  # a run that stopped early stays stopped when rerun
    try:
        for step in range(start + 1, config.total_steps + 1):
            if stopped_early:
                break
            batch = next(batches)
            if step == start + 1:  # compiled ahead of the first call, which reuses it
                compiled = train_step.lower(state, batch).compile()
                with contextlib.suppress(Exception):  # not every backend analyses memory
                    step_memory = compiled.memory_analysis()
                if step_memory is not None and jax.process_index() == 0:
                    figures = memory_figures(step_memory) + device_memory_note(devices[0])
                    tqdm.tqdm.write(f"XLA's buffers for the training step: {figures}")
                short = _host_memory_shortfall(step_memory, devices[0])
                if short is not None:
                    raise memory_error(RuntimeError(short))
            state, metrics = train_step(state, batch)
            pending.append((step, metrics))
            last_step = step
            bar.update(1)
            is_last = step == config.total_steps
            do_eval = is_last or step % config.eval_every == 0
            do_ckpt = is_last or step % config.checkpoint_every == 0
            if step % config.log_every == 0 or do_eval or do_ckpt:
                row = flush(step)
                if do_eval:
                    eval_metrics = evaluate_at(step, row)
                    row.update(
                        accuracy=eval_metrics["accuracy"], test_loss=eval_metrics["test_loss"]
                    )
                    improved = progress.update(step, eval_metrics)
                    if improved and best_manager and step not in best_manager.all_steps():
                        with _interrupt_after():
                            best_manager.save(
                                step,
                                args=ocp.args.Composite(
                                    params=ocp.args.PyTreeSave(state["params"])
                                ),
                            )
                    if progress.should_stop:
                        stopped_early = do_ckpt = True  # save first, then stop
                        log(
                            f"early stop at step {step}: no better {progress.metric} in "
                            f"{progress.patience} evaluations (best {progress.best_value:.4f} at "
                            f"step {progress.best_step})"
                        )
                writer.write(row)
                bar.set_postfix(
                    loss=f"{row['train_loss']:.4f}",
                    img_s_core=f"{row['img_sec_core']:.1f}",
                    **({"acc": f"{row['accuracy']:.4f}"} if do_eval else {}),
                )
                if do_ckpt:
                    save(step)
    except jax.errors.JaxRuntimeError as e:
        if not out_of_memory(e):
            raise
        raise memory_error(e) from None
    finally:
        batches.close()  # stops the prefetch thread (see `prefetch`)
        bar.close()
        manager.wait_until_finished()
        writer.close()

    if not eval_metrics:  # already finished before this call: evaluate the restored state
        eval_metrics = evaluate_at(last_step)
    result = {
        "step": last_step,
        **eval_metrics,
        "stopped_early": stopped_early,
        "micro_batches": micro,
    }
    best_params = None
    if best_manager is not None and progress.best_step is not None:
        result["best"] = {
            "step": progress.best_step,
            "metric": progress.metric,
            "value": progress.best_value,
        }
        best_params = best_manager.restore(
            progress.best_step,
            args=ocp.args.Composite(params=restore_args(target["params"])),
        )["params"]
    if best_manager is not None:
        best_manager.close()
    # Collectives: every process takes part, process 0 writes.
    final_params = parallel.to_host(state["params"]) if config.export_npz else None
    best_params = parallel.to_host(best_params) if best_params is not None else None
    if jax.process_index() == 0:
        log(format_report(eval_metrics, info.class_names, max_classes=REPORT_CLASSES))
        report = os.path.join(workdir, "report.txt")
        with atomic_path(report) as tmp, open(tmp, "w") as f:
            f.write(format_report(eval_metrics, info.class_names) + "\n")
        with atomic_path(os.path.join(workdir, "eval.json")) as tmp, open(tmp, "w") as f:
            json.dump({**result, "class_names": info.class_names}, f)
        writer.plot(os.path.join(workdir, "curves.png"))
        if config.export_npz:
            path = checkpoint.save(final_params, os.path.join(workdir, "model.npz"))
            log(f"exported {path}")
            if best_params is not None:
                path = checkpoint.save(best_params, os.path.join(workdir, "best.npz"))
                log(f"exported {path} (step {progress.best_step})")
        log(
            f"test accuracy {eval_metrics['accuracy']:.4f} after {last_step} steps"
            + (" (stopped early)" if stopped_early else "")
        )
        if "best" in result:
            log(
                f"best {progress.metric} {progress.best_value:.4f} at step {progress.best_step}"
                f" (kept in {workdir}/best/{progress.best_step})"
            )
    return result


# ----------------------------------------------------------------------------- CLI

_PLAIN_FLAGS = [
    "model",
    "dataset",
    "vit_pretrained_dir",
    "pretrained",
    "from_scratch",
    "total_steps",
    "warmup_steps",
    "batch",
    "batch_eval",
    "accum_steps",
    "cpu_block_tokens",
    "cpu_blocks_at_once",
    "base_lr",
    "decay_type",
    "grad_norm_clip",
    "optimizer",
    "weight_decay",
    "image_size",
    "eval_every",
    "checkpoint_every",
    "shuffle_buffer",
    "tfds_data_dir",
    "tfds_manual_dir",
    "dtype",
    "attention",
    "seed",
    "keep_best",
    "early_stop_patience",
    "remat",
    "shard_params",
]


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    d = default_config()
    f = flags
    config_flags.DEFINE_config_file(
        "config",
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "defaults.py"),
        "A config file configs/X.py[:arg] (default: train.default_config()); "
        "--config.KEY=VALUE overrides any field, --config.model_overrides.ATTR=VALUE any "
        "VisionTransformer attribute (dropout_rate=0.1, classifier=gap, ...).",
    )
    f.DEFINE_string("model", None, f"Model name, e.g. ViT-B_16 (default {d.model}).")
    f.DEFINE_string(
        "dataset",
        None,
        "TFDS name (cifar10, cifar100, imagenet2012, ...), an image folder "
        f"ROOT with ROOT/{{train,test}}/<class>/<file> (or ROOT/<class>/<file> and "
        f"--config.test_fraction), or 'digits' (default {d.dataset}).",
    )
    f.DEFINE_string(
        "name",
        None,
        "Run name; the run directory is {logdir}/{name} "
        "(default: {model}-{dataset}-{timestamp}, or the newest unfinished such run).",
    )
    f.DEFINE_string("logdir", "runs", "Parent directory of run directories.")
    f.DEFINE_string(
        "vit_pretrained_dir",
        None,
        f"Directory holding the published {{model}}.npz files (default {d.vit_pretrained_dir!r}).",
    )
    f.DEFINE_string(
        "pretrained",
        None,
        "Explicit checkpoint to fine-tune from (.npz path, gs://, https://, or another run's "
        "directory: its latest checkpoint).",
    )
    f.DEFINE_bool("from_scratch", None, "Start from random weights instead of a checkpoint.")
    f.DEFINE_integer("total_steps", None, f"Number of update steps (default {d.total_steps}).")
    f.DEFINE_integer(
        "warmup_steps", None, f"Linear learning-rate warmup steps (default {d.warmup_steps})."
    )
    f.DEFINE_integer("batch", None, f"Global batch size per update (default {d.batch}).")
    f.DEFINE_integer("batch_eval", None, f"Global evaluation batch size (default {d.batch_eval}).")
    f.DEFINE_integer(
        "accum_steps",
        None,
        "Split each batch into this many micro-batches and accumulate "
        f"gradients (less memory, same update; default {d.accum_steps}).",
    )
    f.DEFINE_integer(
        "cpu_block_tokens",
        None,
        "CPU only: cut each device's micro-batch further into blocks of at most this many tokens "
        "(patches), run one after another, so that their activations stay in cache: the same update, "
        f"ViT-Ti/16 steps 1.6x faster on a 2-core CPU; 0 = off (default {d.cpu_block_tokens}). "
        "Evaluation takes 4x as many where the CPU's largest cache is 64 MiB or more.",
    )
    f.DEFINE_integer(
        "cpu_blocks_at_once",
        None,
        "CPU only: a training step computes this many of those blocks side by side, so that "
        "their small products keep the cores busy (more memory; 1 = one after another; "
        "0 = auto, the default: 2 for models up to ViT-B's width, 768, else 1).",
    )
    f.DEFINE_float("base_lr", None, f"Peak learning rate (default {d.base_lr}).")
    f.DEFINE_enum(
        "decay_type", None, ["cosine", "linear"], f"Decay after warmup (default {d.decay_type})."
    )
    f.DEFINE_float(
        "grad_norm_clip",
        None,
        f"Clip gradients to this global norm; 0 = off (default {d.grad_norm_clip}).",
    )
    f.DEFINE_enum(
        "optimizer",
        None,
        ["sgd", "adamw"],
        f"SGD with momentum 0.9, or AdamW (default {d.optimizer}).",
    )
    f.DEFINE_float("weight_decay", None, f"Decoupled weight decay (default {d.weight_decay}).")
    f.DEFINE_integer(
        "image_size",
        None,
        f"Training and evaluation resolution in pixels (default {d.image_size}).",
    )
    f.DEFINE_integer(
        "eval_every",
        None,
        f"Evaluate on the whole test split every N steps (default {d.eval_every}).",
    )
    f.DEFINE_integer(
        "checkpoint_every",
        None,
        f"Write an orbax checkpoint every N steps (default {d.checkpoint_every}).",
    )
    f.DEFINE_integer(
        "shuffle_buffer", None, f"tf.data shuffle buffer (default {d.shuffle_buffer})."
    )
    f.DEFINE_string(
        "tfds_data_dir", None, "TFDS data directory (default: TFDS's own, ~/tensorflow_datasets)."
    )
    f.DEFINE_string(
        "tfds_manual_dir", None, "Directory with manually downloaded files (imagenet2012)."
    )
    f.DEFINE_enum(
        "dtype",
        None,
        ["auto", "float32", "bfloat16"],
        f"Compute dtype of the matrix products (default {d.dtype}: bfloat16 on TPUs and NVIDIA "
        "GPUs from the A100 on, float32 elsewhere).",
    )
    f.DEFINE_enum(
        "attention",
        None,
        list(models.ATTENTION),
        f"Attention kernel (default {d.attention}: cuDNN flash attention on NVIDIA GPUs from the "
        "A100 on in bfloat16, jax.nn.dot_product_attention in XLA's form on other GPUs and TPUs, "
        "two einsums on CPU). 'xla' is the way around a cuDNN that fails here.",
    )
    f.DEFINE_integer(
        "seed", None, f"Random seed for init, data order, augmentation, dropout (default {d.seed})."
    )
    f.DEFINE_bool(
        "remat",
        None,
        "Recompute each encoder block's activations in the backward pass: much less memory for "
        "~1/3 more compute, the same numbers up to float rounding (default off).",
    )
    f.DEFINE_bool(
        "shard_params",
        None,
        "FSDP: split parameters and optimizer state over all devices along their largest dimension "
        "instead of a copy per device; the same numbers up to float rounding (default off).",
    )
    f.DEFINE_string(
        "coordinator_address",
        None,
        "Multi-process runs: HOST:PORT of process 0, the same on every process (with --num_processes "
        "and --process_id). Without these, Cloud TPU pods, Slurm and Open MPI are detected.",
    )
    f.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes.")
    f.DEFINE_integer("process_id", None, "Multi-process runs: this process, 0..num_processes-1.")
    f.DEFINE_enum(
        "keep_best",
        None,
        ["accuracy", "loss"],
        "Also keep the checkpoint with the best evaluation so far (highest accuracy or lowest test "
        "loss) in RUN/best/, and export it to RUN/best.npz at the end (default: off).",
    )
    f.DEFINE_integer(
        "early_stop_patience",
        None,
        "Stop after N evaluations without a better --keep_best metric (accuracy if not given), "
        "saving a checkpoint first; 0 = never (default 0).",
    )
    return flags.FLAGS


def config_from_flags(flags_obj) -> ml_collections.ConfigDict:
    config = flags_obj.config if flags_obj.config is not None else default_config()
    for name in _PLAIN_FLAGS:
        if flags_obj[name].value is not None:
            config[name] = flags_obj[name].value
    return config


def run_directory(logdir: str, name: str | None, config: ml_collections.ConfigDict) -> str:
    """{logdir}/{name}; without a name, the newest unfinished {model}-{dataset}-* run, else a new one."""
    logdir = os.path.expanduser(logdir)
    if name:
        return os.path.join(logdir, name)
    stem = f"{config.model}-{os.path.basename(os.path.normpath(config.dataset))}"
    unfinished = [
        d
        for d in sorted(glob.glob(os.path.join(logdir, f"{glob.escape(stem)}-*")))
        if os.path.isdir(os.path.join(d, "checkpoints"))
        and not os.path.exists(os.path.join(d, "eval.json"))
    ]
    if unfinished:
        return unfinished[-1]
    return os.path.join(logdir, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def main(argv: list[str] | None = None) -> None:
    from absl import app

    started()
    given, model_overrides = _model_override_args(sys.argv if argv is None else argv)
    sys.argv = argv = given  # absl and ml_collections read the rest
    config_file = _config_file(given)
    if config_file is not None and not os.path.isfile(config_file):
        print(f"error: no config file {config_file} (--config FILE.py[:arg])", file=sys.stderr)
        sys.exit(2)
    try:
        flags_obj = _define_flags()  # loads the default config file and applies --config.KEY to it
    except AttributeError as e:
        _unknown_config_field(e, given)

    if any(arg in ("-h", "-?", "--help", "--helpshort") for arg in given[1:]):
        # absl's own --help prints the __main__ module's docstring and flags, which are not this
        # module's under `vit-train` or `python -m vit_jax train` (and exits with status 1).
        from absl import flags

        module = flags.FLAGS.find_module_defining_flag("model")
        print(f"{__doc__.strip()}\n\nflags:\n\n{flags.FLAGS.module_help(module).strip()}")
        print("\nTry --helpfull to get a list of all flags.")
        return

    def parse_flags(args):  # a --config FILE gets its --config.KEY overrides here
        from absl import flags

        try:
            return flags.FLAGS(args)
        except AttributeError as e:
            _unknown_config_field(e, args)
        except flags.Error as e:
            text = str(e)
            if "Error whilst parsing config file" in text:
                # ml_collections wraps the config file's own error in its traceback: keep its
                # last line (e.g. "ValueError: give the image folder: ...").
                reason = text.strip().splitlines()[-1].strip()
                print(f"error: --config {_config_file(args)}: {reason}", file=sys.stderr)
            else:  # e.g. "flag --batch=abc: invalid literal for int() ..."
                print(f"error: {text} (--helpshort lists the flags)", file=sys.stderr)
            sys.exit(2)

    def _main(args):
        from absl import logging

        logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        workdir = None
        config = default_config()
        try:
            parallel.initialize(
                flags_obj.coordinator_address, flags_obj.num_processes, flags_obj.process_id
            )
            config = config_from_flags(flags_obj)
            if model_overrides:
                config.model_overrides = {**config.model_overrides.to_dict(), **model_overrides}
            if jax.process_count() > 1 and not flags_obj.name:
                raise TrainingError(
                    "a multi-process run needs --name (the same on every process), so that all "
                    "processes use one run directory"
                )
            workdir = run_directory(flags_obj.logdir, flags_obj.name, config)
            train_and_evaluate(config, workdir)
        except (
            TrainingError,
            checkpoint.CheckpointError,
            input_pipeline.DataError,
            parallel.DistributedError,
        ) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except jax.errors.JaxRuntimeError as e:
            if "cudnn" not in str(e).lower() or config.attention in ("xla", "einsum"):
                raise
            # cuDNN's flash attention (the default on A100 and newer GPUs) is compiled by XLA
            # when the step is first run; a cuDNN that cannot build it fails only then.
            print(
                f"error: a cuDNN call failed ({first_line(e)[:300]}). If it is the attention, "
                "rerun with --attention xla (a run with checkpoints resumes from the latest)",
                file=sys.stderr,
            )
            sys.exit(1)
        except KeyboardInterrupt:  # Ctrl-C: where the run stands, not a traceback
            exit_interrupted(f"\n{_interrupted(workdir)}")

    app.run(_main, argv=argv, flags_parser=parse_flags)


def _interrupted(workdir: str | None) -> str:
    """The line printed when Ctrl-C stops a run: what was kept and how to go on."""
    if workdir is None:
        return "interrupted before the run started"
    steps = checkpoint.saved_steps(os.path.join(workdir, "checkpoints"))
    if not steps:
        return f"interrupted before the first checkpoint of {workdir}; a rerun starts over"
    return (
        f"interrupted; the latest checkpoint is step {steps[-1]} in {workdir}/checkpoints. Rerun "
        "the same command to resume from it (the steps after it are trained again)"
    )


_OVERRIDE_FLAG = "--config.model_overrides."
# VisionTransformer attributes set elsewhere than model_overrides, and where.
_OWN_SETTING = {
    "num_classes": "the dataset sets it",
    "dtype": "use --dtype",
    "attention": "use --attention",
    "remat": "use --remat",
    "parent": "not a model option",
    "name": "not a model option",
}


def _model_override_args(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """(argv without them, {attribute: value}) for `--config.model_overrides.ATTR=VALUE` (or
    `... VALUE`): model_overrides starts empty, so ml_collections would refuse every attribute as
    an unknown field. VALUE is a Python literal (0.1, 768, None, '(8, 8)') or a bare string (gap);
    an attribute VisionTransformer lacks, or a value of the wrong kind, exits with one line."""
    fields = models.VisionTransformer.__dataclass_fields__
    rest, overrides = list(argv[:1]), {}
    args = iter(argv[1:])
    for arg in args:
        if not arg.startswith(_OVERRIDE_FLAG):
            rest.append(arg)
            continue
        key, has_value, text = arg[len(_OVERRIDE_FLAG) :].partition("=")
        if not has_value:
            text = next(args, "")
        flag = f"{_OVERRIDE_FLAG}{key}"
        if key not in fields or key in _OWN_SETTING:
            options = [k for k in fields if k not in _OWN_SETTING]
            why = _OWN_SETTING.get(key, "VisionTransformer has no such attribute")
            if key not in fields and (near := difflib.get_close_matches(key, options, n=1)):
                why += f"; did you mean {near[0]}?"
            _usage_error(f"{flag}: {why} (model options: {', '.join(options)})")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word: classifier=gap
        problem = _override_problem(key, value, fields[key].default)
        if problem:
            _usage_error(f"{flag}={text}: {problem}")
        overrides[key] = value
    return rest, overrides


def _override_problem(key: str, value: Any, default: Any) -> str | None:
    """Why `value` cannot replace the VisionTransformer attribute `key` (default `default`)."""

    def ints(v: Any, length: int | None = None) -> bool:
        return (
            isinstance(v, (tuple, list))
            and (length is None or len(v) == length)
            and all(positive_int(x) for x in v)
        )

    def positive_int(v: Any) -> bool:
        return models.is_int_at_least(v, 1)

    if key == "patch_size":
        ok, kind = ints(value, 2), "two integers such as '(16, 16)'"
    elif key == "resnet_layers":
        ok, kind = value is None or ints(value), "None or integers such as '(3, 4, 9)'"
    elif key == "representation_size":
        ok, kind = value is None or positive_int(value), "None or a positive integer"
    elif key == "classifier":
        ok, kind = value in _TRAIN_CLASSIFIERS, " or ".join(_TRAIN_CLASSIFIERS)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        kind = "a number"
    elif isinstance(default, int) and not isinstance(default, bool):
        ok, kind = positive_int(value), "a positive integer"
    else:
        ok, kind = isinstance(value, type(default)), type(default).__name__
    return None if ok else f"expected {kind}"


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _config_file(argv: Sequence[str]) -> str | None:
    """The file of `--config FILE[:arg]` / `--config=FILE[:arg]` in argv, if given."""
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
    return None


def _unknown_config_field(error: AttributeError, argv: Sequence[str]) -> None:
    """Exits with one line for a --config.KEY naming no config field (ml_collections raises an
    AttributeError wrapping a KeyError, whose text may add 'Did you mean ...'); re-raises others."""
    inner = error.args[0] if error.args else error
    text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
    field, *hint = str(text).splitlines()
    field = field.strip("\"'")
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    bad = [a for a in bad if field in a.split(".")[1:]]
    if not bad:
        raise error
    hint = "".join(f" {line}" for line in hint)
    print(
        f"error: {bad[0]}: the config has no field {field!r}.{hint} "
        "(train.default_config() lists every field, with its meaning)",
        file=sys.stderr,
    )
    sys.exit(2)


if __name__ == "__main__":
    main()
