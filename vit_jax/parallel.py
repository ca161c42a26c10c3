"""Devices and processes: multi-host start-up, the ('data',) mesh, FSDP shardings, host <-> device.

One process per host (or per GPU) runs the same program (JAX's multi-controller model). Each process
feeds its own rows of every global batch; arrays span all processes' devices.
"""

from __future__ import annotations

import functools
import glob
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vit_jax.commands import first_line

# Environment variables that mean "this process is one of several" for jax.distributed's own
# cluster detection (Slurm, Open MPI, Cloud TPU pod slices, an explicit coordinator).
_CLUSTER_MARKERS = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


class DistributedError(RuntimeError):
    """A multi-process start-up problem, with what to do about it."""


def _cluster_detected() -> bool:
    for name in _CLUSTER_MARKERS:
        try:
            if int(os.environ.get(name, "1")) > 1:
                return True
        except ValueError:
            pass
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts JAX's multi-process runtime if this is a multi-process run; True if it did.

    With `coordinator_address` ('HOST:PORT' of process 0), `num_processes` and `process_id` given, uses
    them. With none given, starts only where a cluster is detected (Slurm, Open MPI, a Cloud TPU pod
    slice, or JAX_COORDINATOR_ADDRESS set) and lets `jax.distributed.initialize()` read the rest from
    the environment. On CPU the collectives go through gloo. Must run before any other JAX call.
    """
    given = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise DistributedError(
            "give all of --coordinator_address HOST:PORT, --num_processes N and --process_id I "
            "(the same address and N on every process, I = 0..N-1), or none of them to let JAX "
            "detect the cluster (Cloud TPU, Slurm, Open MPI)"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"--process_id {process_id} must be in 0..{num_processes - 1}")
    explicit = coordinator_address is not None
    if not explicit and not _cluster_detected():
        return False
    if explicit and num_processes == 1:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        if explicit:
            jax.distributed.initialize(coordinator_address, num_processes, process_id)
        else:
            jax.distributed.initialize()
    except (RuntimeError, ValueError) as e:
        raise DistributedError(
            f"could not start the multi-process runtime ({first_line(e)}); check that "
            "process 0 runs and its coordinator address is reachable from every process, or pass "
            "--coordinator_address/--num_processes/--process_id explicitly"
        ) from None
    return True


def data_mesh(devices: list | None = None) -> jax.sharding.Mesh:
    """A one-axis ('data',) mesh over `devices` (default: all, of every process), in Auto mode.

    Auto axes let XLA propagate the batch sharding through the model (JAX >= 0.9 makes `make_mesh`
    default to Explicit axes, which rejects mixing a replicated class token with sharded patches).
    """
    devices = devices or jax.devices()
    return jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def fsdp_spec(shape: tuple[int, ...], num_devices: int, min_size: int = 2**12) -> P:
    """FSDP-style placement of one parameter: its largest dimension divisible by the device count is
    split over 'data'; small arrays (< `min_size` elements) and indivisible ones stay replicated."""
    if num_devices == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    candidates = [d for d in range(len(shape)) if shape[d] % num_devices == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda d: (shape[d], -d))
    return P(*[("data" if d == axis else None) for d in range(len(shape))])


def state_shardings(abstract: Any, mesh: jax.sharding.Mesh, shard_params: bool) -> Any:
    """Shardings for a tree of arrays/ShapeDtypeStructs: replicated, or FSDP (`fsdp_spec`)."""
    if not shard_params:
        return jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract)
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), mesh.size)), abstract
    )


# Tokens (patches) per device that a CPU runs through the model at once; see `cpu_blocks`.
CPU_BLOCK_TOKENS = 1024
# Models up to this width (ViT-B's) compute two of those blocks side by side in a training step;
# see `train_blocks_at_once`.
SIDE_BY_SIDE_MAX_WIDTH = 768
# A CPU whose largest cache holds at least this many bytes runs inference in blocks this many times
# a training step's; see `inference_block_tokens`.
LARGE_CACHE_BYTES = 64 * 2**20
LARGE_CACHE_INFERENCE_SCALE = 4


def cpu_blocks(rows: int, tokens_per_row: int, max_tokens: int = CPU_BLOCK_TOKENS) -> int:
    """In how many equal blocks, run one after another, a CPU should push `rows` images (of one
    device) of `tokens_per_row` tokens each through a ViT: the fewest that give blocks of at most
    `max_tokens` tokens (`rows` if a single image is over). 1 on GPU/TPU or when `max_tokens` is 0.

    XLA:CPU writes each op's whole output to memory before the next op reads it. For a batch those
    passes go through RAM; for blocks of about 1000 tokens they stay in the caches. On a 2-core
    machine (32 MiB L3, ~9 GB/s from RAM) a ViT-Ti/16 training step at batch 32 ran 1.6x faster in 8
    blocks and its inference 1.2x; ViT-B/16, whose matmuls dominate, ran as fast as without blocks.
    Accelerators want the whole batch at once. Training steps of models up to ViT-B take two blocks
    at a time (`train_blocks_at_once`); inference may take larger blocks (`inference_block_tokens`).
    """
    if max_tokens <= 0 or jax.default_backend() != "cpu":
        return 1
    for blocks in range(1, rows + 1):
        if rows % blocks == 0 and rows // blocks * tokens_per_row <= max_tokens:
            return blocks
    return rows


@functools.cache
def last_level_cache_bytes(cache_dir: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The size in bytes of the largest cache Linux lists for cpu0 (`cache_dir/index*/size`, e.g.
    '32768K'); None where there is no such listing (macOS, Windows) or none of it can be read."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for path in glob.glob(os.path.join(cache_dir, "index*", "size")):
        try:
            with open(path) as f:
                text = f.read().strip().upper()
            scale = units.get(text[-1:], 1)
            sizes.append(int(text[:-1] if scale > 1 else text) * scale)
        except (OSError, ValueError):
            continue
    return max(sizes) if sizes else None


def inference_block_tokens(train_tokens: int = CPU_BLOCK_TOKENS) -> int:
    """Tokens per device in each CPU cache block of inference (evaluation, predictions, the
    benchmark's forward pass) where a training step's blocks hold `train_tokens` (0: no blocks):
    `LARGE_CACHE_INFERENCE_SCALE` times as many on a CPU whose largest cache
    (`last_level_cache_bytes`) is at least `LARGE_CACHE_BYTES`, else as many.

    Inference keeps no activations for a backward pass, so the blocks guard only the passes between
    ops, and where memory is not much slower than the cache, larger products are worth more. On a
    2-core Xeon with AMX (a 480 MiB last-level cache as its VM reports it; memory copies at 26 GB/s
    within 32 MiB, 13-24 GB/s beyond), 4096-token blocks ran ViT-Ti/16 inference at batch 32
    1.22-1.26x as fast as 1024-token ones in float32 and 1.45-1.54x in bfloat16, ViT-B/16 at batch 8
    (then one block) 1.04-1.07x, while training steps were fastest in 1024-token blocks. On the Zen 4
    (32 MiB L3; 65 GB/s within it, 9 GB/s beyond) 1024-token blocks made ViT-Ti/16 inference up to
    1.25x faster than the whole batch. The threshold between the two is a choice: no machine with a
    cache between 32 and 480 MiB has been measured.
    """
    cache = last_level_cache_bytes()
    if cache is not None and cache >= LARGE_CACHE_BYTES:
        return train_tokens * LARGE_CACHE_INFERENCE_SCALE
    return train_tokens


def blocks_at_once(blocks: int, at_once: int) -> int:
    """How many of a loop's `blocks` CPU cache blocks run side by side (the `jax.lax.scan` unroll):
    `at_once`, at most `blocks`; 1 when the batch is not cut (GPU/TPU, blocking off)."""
    return max(1, min(blocks, at_once))


def train_blocks_at_once(width: int, at_once: int = 0) -> int:
    """How many CPU cache blocks a training step of a model `width` (hidden size) wide computes side
    by side: `at_once`, or for 0 (auto) 2 up to `SIDE_BY_SIDE_MAX_WIDTH` and 1 above.

    XLA:CPU runs independent ops at the same time, each on fewer cores. A block's small products
    (attention's batched (197, 64) ones above all) ran no faster on 2 cores than on 1, so two blocks
    at once keep both cores busier: ViT-Ti/16 float32 training steps 3-5 % faster and ViT-B/16
    bfloat16 ones 5-7 % on a 2-core machine, for twice the blocks' activations. ViT-L/16 (1024 wide)
    gained nothing, and its temporaries at 384 px would grow by 2.4 GiB; nor did inference (ViT-Ti/16
    level, ViT-B/16 up to a few per cent slower), which takes one block at a time. The results are
    the same either way.
    """
    if at_once:
        return at_once
    return 2 if width <= SIDE_BY_SIDE_MAX_WIDTH else 1


def strided_rows(x: jax.Array, blocks: int) -> jax.Array:
    """(B, ...) -> (B // blocks, blocks, ...), a reshape (no copy) whose block j (`rows_block`)
    holds rows j, j + blocks, ..., so that every block of a batch sharded along its rows is spread
    over all the devices."""
    return x.reshape(x.shape[0] // blocks, blocks, *x.shape[1:])


def rows_block(x: jax.Array, j: jax.Array | int) -> jax.Array:
    """Block `j` of `strided_rows`'s (B // blocks, blocks, ...) array: (B // blocks, ...), rows
    j, j + blocks, ... of the batch. Inside a loop over `j` it is read in place, block by block,
    instead of the whole batch being copied into block order first."""
    return jax.lax.dynamic_index_in_dim(x, j, axis=1, keepdims=False)


def merge_rows(x: jax.Array) -> jax.Array:
    """(blocks, B // blocks, ...) results of the blocks of `strided_rows` -> (B, ...) in the
    batch's order."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def map_in_blocks(fn: Any, x: jax.Array, blocks: int, at_once: int = 1) -> Any:
    """`fn(x)` for a function of independent rows, computed in `blocks` rows-blocks, `at_once` of
    them side by side (`blocks_at_once`); `fn` returns arrays (or a tree of them) with the rows
    first."""
    if blocks == 1:
        return fn(x)
    rows = strided_rows(x, blocks)
    _, out = jax.lax.scan(
        lambda carry, j: (carry, fn(rows_block(rows, j))),
        None,
        jnp.arange(blocks),
        unroll=blocks_at_once(blocks, at_once),
    )
    return jax.tree.map(merge_rows, out)


def model_blocks(
    model: Any, image_shape: Any, num_devices: int = 1, max_tokens: int = CPU_BLOCK_TOKENS
) -> int:
    """`cpu_blocks` for a global NHWC batch of `image_shape` through a `VisionTransformer`, its rows
    split over `num_devices`."""
    rows = image_shape[0] // num_devices
    return cpu_blocks(rows, model.num_tokens(tuple(image_shape[1:3])), max_tokens)


def apply_in_blocks(
    model: Any,
    params: Any,
    images: jax.Array,
    num_devices: int = 1,
    max_tokens: int | None = None,
    at_once: int = 1,
) -> jax.Array:
    """`model.apply({'params': params}, images, train=False)`, on CPU in `model_blocks` blocks of at
    most `max_tokens` tokens per device (None: `inference_block_tokens()`), `at_once` of them side by
    side."""
    if max_tokens is None:
        max_tokens = inference_block_tokens()
    blocks = model_blocks(model, images.shape, num_devices, max_tokens)
    return map_in_blocks(
        lambda x: model.apply({"params": params}, x, train=False), images, blocks, at_once
    )


def to_device(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays sharded along the batch axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def put(tree: Any, shardings: Any) -> Any:
    """Host arrays (the same on every process) -> global arrays with `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
        tree,
        shardings,
    )


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy, whole, on every process (a collective: call it on all processes)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
