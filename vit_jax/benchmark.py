"""Throughput of a ViT on this machine, against the matmul peak measured in the same run.

    python -m vit_jax.benchmark --model ViT-B_16 --image_size 224 --batch 8 --mode infer --dtype float32
    python -m vit_jax.benchmark --model ViT-Ti_16 --batch 32 --mode train --json
    python -m vit_jax.benchmark --mode input --image_size 384      # preprocessing img/s, CIFAR-shaped
    python -m vit_jax.benchmark --mode train --profile /tmp/prof   # + kernel time by kind, top kernels

Prints compile time, median step time (and the fastest and slowest step), img/s (total and per
device), model GFLOPs per image (XLA's count of the forward pass, attention counted in its einsum form;
a training step counts 3x), achieved GFLOP/s, and that as a percentage of the peak matmul GFLOP/s of
the same devices and dtype (all devices at once, the best of a few square sizes, measured before and
after the model; the higher figure counts), and which attention the program runs (cuDNN flash
attention, XLA's fused form, or XLA:CPU's einsums).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vit_jax.commands import (
    device_memory_note,
    first_line,
    host_memory_shortfall,
    huge_pages_setting,
    interruptible,
    nonnegative_int,
    out_of_memory,
    positive_int,
    prog,
)


def _time(fn: Callable[[], Any], steps: int, warmup: int = 1) -> list[float]:
    """Per-call seconds of `steps` calls of `fn`, after 1 + `warmup` untimed ones (the first of
    which compiles a function that is not compiled yet)."""
    import jax

    for _ in range(1 + warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def _peak_rss_gib() -> float:
    """This process's peak resident memory so far, GiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _out_of_memory(
    result: dict[str, Any], error: BaseException | str, what: str, tips: str
) -> dict[str, Any]:
    """`result` with the `error` of a run of `what` that ran out of memory (XLA's reason, or the
    reason it would, `host_memory_shortfall`'s; the device's memory, `tips`) and the peak host
    memory; any other error is raised again."""
    import jax

    if isinstance(error, BaseException) and not out_of_memory(error):
        raise error
    reason = error if isinstance(error, str) else first_line(error)[:200]
    result["peak_rss_gib"] = _peak_rss_gib()
    result["error"] = (
        f"out of memory running {what}: {reason}{device_memory_note(jax.devices()[0])}; try {tips}"
    )
    return result


# Square sizes whose best rate is the peak. One size is not enough: on a Zen 4 EPYC, bfloat16 products
# ran at 297, 382 and 266 GFLOP/s at 1024, 1536 and 2048 (float32: 184, 205, 193), so a 2048-only
# peak put ViT-B/16 bfloat16 inference at 110 % of it.
CPU_PEAK_SIZES = (1024, 1536, 2048)
ACCELERATOR_PEAK_SIZES = (4096, 8192)


def matmul_peak_gflops(
    dtype: Any,
    size: int | Sequence[int] | None = None,
    steps: int = 10,
    devices: Sequence[Any] | None = None,
) -> float:
    """Peak GFLOP/s of `devices` (default: all) running a square matmul in `dtype` each, at once: the
    best of the sizes in `size` (default `CPU_PEAK_SIZES` on CPU, else `ACCELERATOR_PEAK_SIZES`).

    Each device multiplies its own (n, n) block of random normal numbers (median of `steps`):
    devices that share hardware (fake CPU devices, which share the host's cores) are not counted as
    if they did not.
    The product accumulates in float32 as the model's Dense layers do (`models.dot_general`); for
    bfloat16 on XLA:CPU that is also the only form that reaches the bfloat16 (AMX / AVX512-BF16) kernels.
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from vit_jax.models import dot_general
    from vit_jax.parallel import data_mesh

    devices = list(devices or jax.devices())
    mesh = data_mesh(devices)
    if size is None:
        size = CPU_PEAK_SIZES if devices[0].platform == "cpu" else ACCELERATOR_PEAK_SIZES
    dot = dot_general(dtype)
    f = jax.jit(lambda x, y: dot(x, y, (((1,), (0,)), ((), ()))))

    # Random operands: constant ones or zeros toggle fewer bits, and a GPU runs them faster (an H200
    # multiplied zeros 13 % faster than random data), which would raise the peak above real work's.
    def normal(key: jax.Array, shape: tuple[int, int], spec: P) -> jax.Array:
        make = jax.jit(
            lambda k: jax.random.normal(k, shape, dtype), out_shardings=NamedSharding(mesh, spec)
        )
        return make(key)

    key_a, key_b = jax.random.split(jax.random.key(0))
    best = 0.0
    for n in [size] if isinstance(size, int) else size:
        a = normal(key_a, (len(devices) * n, n), P("data"))
        b = normal(key_b, (n, n), P())
        times = _time(lambda a=a, b=b: f(a, b), steps)
        best = max(best, 2 * n**3 * len(devices) / statistics.median(times) / 1e9)
    return best


ATTENTION_CHOICES = ("auto", "cudnn", "xla", "einsum")  # models.ATTENTION (that imports JAX)
ATTENTION_KERNELS = {
    "cudnn": "cuDNN flash attention",
    "xla": "jax.nn.dot_product_attention, XLA's",
    "einsum": "two einsums in the heads-major layout, for XLA:CPU",
}


def attention_kernel(lowered: Any, path: str) -> str:
    """Which attention a lowered (`jax.jit(...).lower(...)`) ViT program runs, a key of
    `ATTENTION_KERNELS`, given the one its model picked (`models.attention_path`): the fused forms
    are read from the program itself, so a cuDNN call that fell back to XLA's attention
    (`models.fused_attention`) shows as "xla"."""
    if path == "einsum":
        return "einsum"
    return "cudnn" if "__cudnn$fmha" in lowered.as_text() else "xla"


PROFILE_STEPS = 3
# Kernel kinds by name: cuDNN's attention kernels, then matrix products (cuBLAS/nvjet/CUTLASS GEMMs,
# XLA's Triton GEMM fusions, XLA:CPU's dot thunks and YNNPACK/oneDNN fusions); the rest is "other"
# (elementwise, reductions, transposes, copies).
_KINDS = (
    ("attention", re.compile(r"fmha|flash|sdpa|dot_product_attention|dot_do_o|convert_dq")),
    ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|^dot|ynn|onednn|convolution")),
)


def profile(fn: Callable[[], Any], log_dir: str, steps: int = PROFILE_STEPS) -> dict[str, Any]:
    """Runs `fn` (a compiled step, already warm) `steps` times under `jax.profiler`, writing the
    trace (TensorBoard/XProf, and Perfetto's `perfetto_trace.json.gz`) under `log_dir`; returns
    `kernel_times` of it and the trace's path."""
    import jax

    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(fn())
    traces = glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "perfetto_trace.json.gz"))
    if not traces:
        raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {log_dir}")
    path = max(traces, key=os.path.getmtime)  # this run's, if the folder holds earlier ones
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    return {"trace": path, **kernel_times(events, steps)}


def kernel_times(events: list[dict[str, Any]], steps: int, top: int = 10) -> dict[str, Any]:
    """Per-step time of the compiled program's kernels in a Chrome/Perfetto trace's `events`.

    Kernels are the complete ("X") events of accelerator processes (`/device:...`: GPU kernels, by
    kernel or fusion name) or, on XLA:CPU, the host events that carry an `hlo_op` (its thunks, timed on
    whichever thread ran them; threads overlap, so on CPU the sum is thread time, not wall time, and
    it undercounts Eigen's `dot`/`dot_general`, which XLA:CPU runs partly outside their thunks' events).
    A host event that holds others on its thread (a while loop's thunk) is left out and its parts
    counted; GPU kernels are all counted (those of one stream can overlap in the trace).
    Returns `kernel_ms_per_step`, `by_kind_ms` (attention, matmul, other; by name, see `_KINDS`) and
    the `top` names by time with a trailing fusion number dropped (`loop_add_fusion_12` and `.13`
    count as one), each with its ms and calls per step.
    """
    device = {
        e["pid"]
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and str(e.get("args", {}).get("name", "")).startswith("/device:")
    }
    kernels = sorted(
        (
            e
            for e in events
            if e.get("ph") == "X" and (e.get("pid") in device or "hlo_op" in e.get("args", {}))
        ),
        key=lambda e: (e["pid"], e["tid"], float(e["ts"]), -float(e.get("dur", 0.0))),
    )
    total: dict[str, float] = {}
    calls: dict[str, int] = {}
    for e, after in zip(kernels, [*kernels[1:], None], strict=True):
        end = float(e["ts"]) + float(e.get("dur", 0.0))
        holds_next = (
            e["pid"] not in device  # GPU kernels of one stream can overlap in a trace
            and after is not None
            and (after["pid"], after["tid"]) == (e["pid"], e["tid"])
            and float(after["ts"]) < end
        )
        if holds_next:
            continue  # a thunk that holds others (XLA:CPU's while loops): count those
        name = re.sub(r"[._]\d+$", "", str(e["name"]))
        total[name] = total.get(name, 0.0) + float(e.get("dur", 0.0)) / 1e3 / steps  # us -> ms
        calls[name] = calls.get(name, 0) + 1
    kinds = {"attention": 0.0, "matmul": 0.0, "other": 0.0}
    for name, ms in total.items():
        kind = next((k for k, pattern in _KINDS if pattern.search(name.lower())), "other")
        kinds[kind] += ms
    ranked = sorted(total, key=total.get, reverse=True)[:top]
    return {
        "kernel_ms_per_step": sum(total.values()),
        "by_kind_ms": kinds,
        "top": [
            {"name": n, "ms_per_step": total[n], "calls_per_step": calls[n] / steps} for n in ranked
        ],
    }


def step_config(batch: int, accum_steps: int = 1) -> Any:
    """The training configuration of the benchmark's step (`train.default_config()`, an
    `ml_collections.ConfigDict`): a global `batch` in `accum_steps` micro-batches, SGD with float32
    momentum, the learning rate past its warm-up."""
    from vit_jax import train

    config = train.default_config()
    config.batch, config.accum_steps, config.warmup_steps = batch, accum_steps, 0
    config.optimizer, config.momentum_dtype = "sgd", "float32"
    return config


def run(
    model_name: str = "ViT-B_16",
    image_size: int = 224,
    batch: int = 8,
    mode: str = "infer",
    dtype: str = "auto",
    steps: int = 10,
    num_classes: int = 1000,
    remat: bool = False,
    shard_params: bool = False,
    cpu_block_tokens: int | None = None,
    attention: str = "auto",
    cpu_blocks_at_once: int | None = None,
    profile_dir: str | None = None,
) -> dict[str, Any]:
    """Measures one configuration; returns the figures as a dict.

    Training also reports memory: XLA's buffer sizes for the compiled step (arguments, i.e. the state
    and batch, and temporaries, i.e. activations and gradients) and the process's peak RSS. A step that
    runs out of memory returns those figures with an `error` instead of timings.
    `cpu_block_tokens` (None: the default, `parallel.CPU_BLOCK_TOKENS` for training and
    `parallel.inference_block_tokens()` for inference, reported as the result's `cpu_block_tokens`)
    sets the CPU cache blocking (`parallel.cpu_blocks`) and `cpu_blocks_at_once` how many blocks
    run side by side (None: as training and evaluation run them, `train.blocks_side_by_side` and
    1); the result's `micro_batches` says in how many blocks a step ran and `blocks_at_once` how
    many of them at a time.
    `attention` is the model's attention setting (`models.ATTENTION`); the result's `attention` is
    the kernel the compiled program runs. `dtype` "auto" is `models.default_compute_dtype()`.
    `profile_dir`: after the timed steps, `PROFILE_STEPS` more run under `jax.profiler`, whose trace
    goes there; the result's `profile` sums its kernels (`kernel_times`).
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if dtype == "auto":
        from vit_jax.models import default_compute_dtype

        dtype = default_compute_dtype().name
    result: dict[str, Any] = {
        "model": model_name, "mode": mode, "dtype": dtype, "batch": batch, "image_size": image_size,
        "steps": steps,
        "devices": jax.device_count(), "platform": jax.devices()[0].platform,
        "remat": remat, "shard_params": shard_params, "glibc_hugetlb": huge_pages_setting(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }  # fmt: skip
    if batch < 1 or steps < 1 or image_size < 1:
        raise ValueError(
            f"batch={batch}, steps={steps}, image_size={image_size}: each must be at least 1"
        )
    if mode == "input" and profile_dir is not None:
        raise ValueError("--profile traces model steps: use it with --mode infer or train")
    if mode == "input":
        return {**result, **_input_throughput(image_size, batch, steps)}
    if profile_dir is not None:
        try:
            os.makedirs(profile_dir, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot write the profile to {profile_dir}: {e.strerror}") from None
    if batch % jax.device_count():
        n = jax.device_count()
        raise ValueError(f"batch {batch} does not divide over {n} devices: use a multiple of {n}")

    from vit_jax import models, parallel, summary, train

    model = models.get_model(
        model_name, num_classes=num_classes, dtype=jnp.dtype(dtype), remat=remat,
        attention=attention,
    )  # fmt: skip
    path = model.attention_path()
    mesh = parallel.data_mesh()
    data = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    images = jax.device_put(
        jax.random.uniform(
            jax.random.key(0), (batch, image_size, image_size, 3), minval=-1, maxval=1
        ),
        data,
    )
    params = jax.jit(
        lambda k: model.init(k, images[:1], train=False)["params"], out_shardings=replicated
    )(jax.random.key(1))
    gflops_image = summary.forward_gflops(model, image_size)
    # The peak is measured before and after the model and the higher figure kept: on a shared machine
    # one measurement can land in a slow spell and make the model look faster than the hardware.
    peak_before = matmul_peak_gflops(jnp.dtype(dtype))

    if mode == "infer":
        # Inference keeps the weights in the compute dtype, as a deployment would (no per-call casts).
        params = jax.tree.map(lambda p: p.astype(model.dtype), params)
        max_tokens = (
            parallel.inference_block_tokens() if cpu_block_tokens is None else cpu_block_tokens
        )
        result["cpu_block_tokens"] = max_tokens
        n_dev = jax.device_count()
        result["micro_batches"] = parallel.model_blocks(model, images.shape, n_dev, max_tokens)
        at_once = cpu_blocks_at_once or 1  # as evaluation and predictions
        result["blocks_at_once"] = parallel.blocks_at_once(result["micro_batches"], at_once)
        forward = jax.jit(
            lambda p, x: parallel.apply_in_blocks(model, p, x, n_dev, max_tokens, at_once)
        )
        t0 = time.perf_counter()
        lowered = forward.lower(params, images)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        on_cpu = result["platform"] == "cpu"
        tips = "a smaller --batch" + (" or --cpu_block_tokens" if on_cpu else "")
        short = host_memory_shortfall(compiled.memory_analysis(), jax.devices()[0])
        if short is not None:  # Linux would end the process in the first call
            return _out_of_memory(result, short, "the forward pass", tips)
        try:
            times = _time(lambda: compiled(params, images), steps, warmup=0)  # compiled already
        except jax.errors.JaxRuntimeError as e:
            return _out_of_memory(result, e, "the forward pass", tips)
        if profile_dir is not None:
            result["profile"] = profile(lambda: compiled(params, images), profile_dir)
        flops_factor = 1
    elif mode == "train":
        config = step_config(batch)
        if cpu_block_tokens is not None:
            config.cpu_block_tokens = cpu_block_tokens
        config.cpu_blocks_at_once = cpu_blocks_at_once or 0  # 0: auto, as in training
        result["cpu_block_tokens"] = config.cpu_block_tokens
        result["micro_batches"] = train.micro_batches(
            model, config, images.shape, jax.device_count()
        )
        result["blocks_at_once"] = train.blocks_side_by_side(
            model, config, images.shape, jax.device_count()
        )
        tx = train.make_optimizer(config)
        abstract = jax.eval_shape(lambda p: train.initial_state(p, tx), params)
        shardings = parallel.state_shardings(abstract, mesh, shard_params)
        step = train.make_train_step(model, tx, config, mesh, shardings)
        state = jax.jit(lambda p: train.initial_state(p, tx), out_shardings=shardings)(params)
        del params
        batch_arrays = {
            "image": images,
            "label": jax.device_put(jnp.zeros((batch,), jnp.int32), data),
        }
        # Compiled ahead of time, once: its memory analysis is known before the first step runs.
        t0 = time.perf_counter()
        lowered = step.lower(state, batch_arrays)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        memory = compiled.memory_analysis()
        if memory is not None:
            result["xla_argument_gib"] = memory.argument_size_in_bytes / 2**30
            result["xla_temp_gib"] = memory.temp_size_in_bytes / 2**30
        holder = {"state": state}

        def one_step():
            holder["state"], metrics = compiled(holder["state"], batch_arrays)
            return metrics["loss"]

        on_cpu = result["platform"] == "cpu"
        tips = (
            "--remat, --shard_params over more devices, --dtype bfloat16"
            + (", a smaller --cpu_block_tokens" if on_cpu else "")
            + " or a smaller --batch"
        )
        short = host_memory_shortfall(memory, jax.devices()[0])
        if short is not None:  # Linux would end the process in the first step
            return _out_of_memory(result, short, "the step", tips)
        try:
            times = _time(one_step, steps)
        except jax.errors.JaxRuntimeError as e:
            return _out_of_memory(result, e, "the step", tips)
        if profile_dir is not None:
            result["profile"] = profile(one_step, profile_dir)
        flops_factor = 3  # forward + backward (about 2x forward)
    else:
        raise ValueError(f"unknown mode {mode!r}: use infer, train or input")

    median = statistics.median(times)
    result["peak_rss_gib"] = _peak_rss_gib()
    result["attention"] = attention_kernel(lowered, path)
    achieved = flops_factor * gflops_image * batch / median
    peak = max(peak_before, matmul_peak_gflops(jnp.dtype(dtype)))
    return {
        **result,
        "compile_s": compile_s,
        "median_step_s": median,
        "min_step_s": min(times),
        "max_step_s": max(times),
        "img_s": batch / median,
        "img_s_per_device": batch / median / jax.device_count(),
        "gflops_per_image": gflops_image * flops_factor,
        "achieved_gflops": achieved,
        "peak_matmul_gflops": peak,
        "percent_of_peak": 100 * achieved / peak,
    }


def _input_throughput(image_size: int, batch: int, steps: int) -> dict[str, Any]:
    """Training preprocessing (crop, resize, flip) of CIFAR-shaped uint8 images to `image_size`."""
    from vit_jax import input_pipeline, train

    tf = input_pipeline._tf()
    config = train.default_config()
    config.image_size = image_size
    images = np.random.default_rng(0).integers(0, 255, (4096, 32, 32, 3), dtype=np.uint8)
    ds = tf.data.Dataset.from_tensor_slices(images).repeat().enumerate()
    ds = ds.map(
        lambda i, im: input_pipeline.preprocess_train(im, i, config, encoded=False),
        num_parallel_calls=input_pipeline.parallel_calls(),
    )
    it = input_pipeline.numpy_iterator(ds.batch(batch).prefetch(tf.data.AUTOTUNE))
    next(it)
    n = max(steps, 20)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    seconds = time.perf_counter() - t0
    return {"img_s": n * batch / seconds, "median_step_s": seconds / n, "steps": n}


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog("vit_jax.benchmark"), description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default="ViT-B_16")
    parser.add_argument("--image_size", type=positive_int, default=224)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--mode", choices=["infer", "train", "input"], default="infer")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="compute dtype (default auto, as in training: bfloat16 on TPUs and NVIDIA GPUs from "
        "the A100 on, float32 elsewhere)",
    )
    parser.add_argument(
        "--attention",
        choices=ATTENTION_CHOICES,
        default="auto",
        help="attention kernel (default auto, as in training: cuDNN flash attention on NVIDIA GPUs "
        "from the A100 on in bfloat16, XLA's fused form on other GPUs and TPUs, einsums on CPU)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=10, help="timed steps after compile + warm-up"
    )
    parser.add_argument(
        "--remat", action="store_true", help="train: recompute encoder blocks in the backward pass"
    )
    parser.add_argument(
        "--shard_params",
        action="store_true",
        help="train: FSDP, parameters and optimizer state split over the devices",
    )
    parser.add_argument(
        "--cpu_block_tokens",
        type=nonnegative_int,
        default=None,
        help="CPU: run the batch in blocks of at most this many tokens per device, one after "
        "another (0 = the whole batch at once; default 1024, for inference 4096 where the CPU's "
        "largest cache is 64 MiB or more)",
    )
    parser.add_argument(
        "--cpu_blocks_at_once",
        type=positive_int,
        default=None,
        help="CPU: compute this many of those blocks side by side (default: as training and "
        "evaluation do, for train 2 up to ViT-B's width and 1 above, for infer 1)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help=f"after the timed steps, trace {PROFILE_STEPS} more with jax.profiler into DIR "
        "(TensorBoard/XProf and Perfetto files) and print their kernel time by kind and the "
        "costliest kernels",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        r = run(
            args.model, args.image_size, args.batch, args.mode, args.dtype, args.steps,
            remat=args.remat, shard_params=args.shard_params,
            cpu_block_tokens=args.cpu_block_tokens, attention=args.attention,
            cpu_blocks_at_once=args.cpu_blocks_at_once, profile_dir=args.profile,
        )  # fmt: skip
    except ValueError as e:  # an unknown model, an image size the patch size does not divide
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)  # bad input, as in the other commands
    if args.json:
        print(json.dumps(r))
        if "error" in r:
            raise SystemExit(1)
        return
    print(f"{r['model']} {r['mode']} {r['dtype']} batch {r['batch']} at {r['image_size']}px on "
          f"{r['devices']} {r['platform']} device(s)")  # fmt: skip
    if "error" in r:
        _print_memory(r)
        raise SystemExit(f"error: {r['error']}")
    if args.mode == "input":
        print(f"preprocessing: {r['img_s']:.0f} img/s")
        return
    print(f"compile            {r['compile_s']:.2f} s")
    print(
        f"median step        {1000 * r['median_step_s']:.1f} ms"
        + (
            f" (in {r['micro_batches']} blocks, {r['blocks_at_once']} at a time)"
            if r.get("micro_batches", 1) > 1
            else ""
        )
    )
    print(
        f"fastest, slowest   {1000 * r['min_step_s']:.1f}, {1000 * r['max_step_s']:.1f} ms "
        f"(of {r['steps']} timed)"
    )
    print(f"throughput         {r['img_s']:.1f} img/s ({r['img_s_per_device']:.1f} per device)")
    print(
        f"model GFLOPs/image {r['gflops_per_image']:.2f}"
        + (" (3x forward)" if args.mode == "train" else "")
    )
    print(f"achieved           {r['achieved_gflops']:.1f} GFLOP/s")
    print(f"matmul peak        {r['peak_matmul_gflops']:.1f} GFLOP/s ({r['dtype']}, same devices)")
    print(f"of peak            {r['percent_of_peak']:.1f} %")
    print(f"attention          {r['attention']} ({ATTENTION_KERNELS[r['attention']]})")
    _print_memory(r)
    if "profile" in r:
        _print_profile(r["profile"], r["platform"])


def _print_profile(p: dict[str, Any], platform: str) -> None:
    kinds = ", ".join(f"{k} {ms:.1f}" for k, ms in p["by_kind_ms"].items())
    what = "thread time" if platform == "cpu" else "kernel time"
    print(f"profile            {p['trace']}")
    print(f"profiled kernels   {p['kernel_ms_per_step']:.1f} ms {what} per step ({kinds})")
    for t in p["top"]:
        print(f"  {t['ms_per_step']:8.2f} ms {t['calls_per_step']:6.0f}x  {t['name'][:90]}")


def _print_memory(r: dict[str, Any]) -> None:
    if "xla_temp_gib" in r:
        print(
            f"XLA step buffers   {r['xla_argument_gib']:.2f} GiB state+batch, "
            f"{r['xla_temp_gib']:.2f} GiB temporaries"
            + (" (remat)" if r["remat"] else "")
            + (" (FSDP)" if r["shard_params"] else "")
        )
    pages = "huge pages" if r.get("glibc_hugetlb") in ("1", "2") else "4 KiB pages"
    print(f"peak host memory   {r['peak_rss_gib']:.2f} GiB (process max RSS; glibc: {pages})")


if __name__ == "__main__":
    main()
