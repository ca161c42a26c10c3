"""Compiles the benchmark's training step for an NVIDIA GPU on a machine without one, and prints
where the compiled step moves memory: bytes in and out of each fusion of the entry computation
and of its micro-batch loop (times the loop's trip count), by kind, with the matrix products (GEMM
fusions, cuBLAS calls) and cuDNN's attention apart.

Not run by CI. For changes that touch the GPU program when no GPU is at hand:

    pip install 'jax[cuda13]==<the installed jax version>'
    python .ci/gpu_hlo.py --model ViT-B_16 --image_size 384 --batch 64 [--accum_steps 8]
        [--top 20] [--hlo FILE]

XLA compiles for a described GPU (an H200 by default: `--spec FILE` takes another GpuTargetConfig
text proto) with no device attached, so nothing is autotuned: the products' kernels and tile sizes
are XLA's defaults, not those a GPU would pick, and some shapes do not compile at all (e.g. the
`--attention xla` step of ViT-B/16 at 384 px: "Couldn't find output tile sizes"). Layouts and the
fusions around the products are the ones a GPU gets. The byte counts assume that each fusion reads
each operand and writes each result once (an in-place dynamic-update-slice only its update, a
dynamic-slice only what it returns); divided by the memory bandwidth they are a lower bound on
the fusions' time, not a measurement.
"""

import argparse
import collections
import math
import os
import re
import sys
from typing import Any

# An H200 as XLA's GpuTargetConfig describes a GPU (NVIDIA's datasheet figures: 132 SMs, 4.8 TB/s,
# 141 GB of HBM3e, 50 MiB of L2, compute capability 9.0).
H200 = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 150323855360
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "NVIDIA H200"
"""

BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}
BYTES |= {"s64": 8, "u64": 8, "f64": 8}
SHAPE = re.compile(r"\b(\w+)\[([\d,]*)\]")
INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z\-]+)\((.*?)\)(.*)$")
SKIPPED = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant"}


def shape_bytes(text: str) -> int:
    """Bytes of every array shape in `text` (an HLO result type, a tuple's summed)."""
    total = 0
    for dtype, dims in SHAPE.findall(text):
        if dtype in BYTES:
            total += BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def traffic(hlo: str) -> list[dict[str, Any]]:
    """One row per instruction that does work in the entry computation of compiled HLO text, and in
    the bodies of its while loops (a micro-batch loop, `--accum_steps`): its name, how many times it
    runs (a loop's known trip count), class (gemm, cudnn, or the fusion kind with +T when it
    transposes and +R when it reduces), operand and result bytes of one run, result type, and the
    op_name of its metadata."""
    bodies = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^(?:ENTRY )?%([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo, re.M | re.S)
    }
    rows: list[dict[str, Any]] = []

    def walk(computation: str, times: int) -> None:
        sizes: dict[str, int] = {}
        for line in bodies[computation].splitlines():
            m = INSTRUCTION.match(line)
            if not m:
                continue
            name, result, opcode, operands, rest = m.groups()
            sizes[name] = shape_bytes(result)
            if opcode == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
                walk(
                    re.search(r"body=%([\w.\-]+)", rest).group(1),
                    times * int(trips.group(1) if trips else 1),
                )
                continue
            if opcode in SKIPPED:
                continue
            kind = re.search(r"kind=(k\w+)", rest)
            calls = re.search(r"calls=%([\w.\-]+)", rest)
            body = bodies.get(calls.group(1), "") if calls else ""
            reads = [sizes.get(o, 0) for o in re.findall(r"%([\w.\-]+)", operands)]
            writes = sizes[name]
            if reads and (" dynamic-update-slice(" in body or opcode == "dynamic-update-slice"):
                # In place: only the update is read and written, not the buffer it lands in.
                reads.remove(max(reads))
                writes = sum(reads)
            elif reads and (" dynamic-slice(" in body or opcode == "dynamic-slice"):
                reads[reads.index(max(reads))] = writes  # reads only the slice it returns
            if "cudnn" in rest:
                cls = "cudnn"
            elif "gemm" in rest or "cublas" in rest:
                cls = "gemm"
            elif kind:
                cls = kind.group(1) + ("+T" if " transpose(" in body else "")
                cls += "+R" if " reduce(" in body else ""
            else:
                cls = opcode
            op_name = re.search(r'op_name="([^"]*)"', rest)
            rows.append({
                "name": name, "times": times, "class": cls, "result": result,
                "in": sum(reads), "out": writes, "op_name": op_name.group(1) if op_name else "",
            })  # fmt: skip

    walk(re.search(r"^ENTRY %([\w.\-]+)", hlo, re.M).group(1), 1)
    return rows


def compile_step(args: argparse.Namespace, spec: str) -> Any:
    # The CUDA plugin still loads (topologies need it) but skips its check of the CUDA libraries,
    # which fails on a machine without a GPU's driver (cuPTI "Unknown CUPTI error 999").
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    try:
        topology = topologies.get_topology_desc(
            platform="cuda", topology="1x1x1", target_config=spec
        )
    except Exception as e:  # no CUDA plugin, or one that cannot describe the target
        sys.exit(
            f"cannot compile for a GPU here ({str(e).splitlines()[0][:200]}): install jax's "
            f"CUDA plugin for this jax, pip install 'jax[cuda13]=={jax.__version__}'"
        )
    devices = list(topology.devices)
    # The model and training code ask the attached devices which kernels and blocking to use.
    jax.default_backend = lambda: "gpu"
    jax.local_devices = lambda *a, **k: devices
    from vit_jax import benchmark, models, parallel, train

    models.cuda_compute_capability = lambda device: (9, 0)
    model = models.get_model(
        args.model, num_classes=1000, dtype=jnp.dtype(args.dtype), attention=args.attention
    )
    mesh = parallel.data_mesh(devices)
    config = benchmark.step_config(args.batch, args.accum_steps)
    tx = train.make_optimizer(config)
    size = args.image_size
    params = jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((1, size, size, 3)), train=False)["params"],
        jax.random.key(0),
    )
    abstract = jax.eval_shape(lambda p: train.initial_state(p, tx), params)
    shardings = parallel.state_shardings(abstract, mesh, False)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    data = NamedSharding(mesh, P("data"))
    batch = {
        "image": jax.ShapeDtypeStruct((args.batch, size, size, 3), jnp.float32, sharding=data),
        "label": jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=data),
    }
    step = train.make_train_step(model, tx, config, mesh, shardings)
    return step.lower(state, batch).compile()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B_16")
    parser.add_argument("--image_size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--attention", default="cudnn")
    parser.add_argument("--accum_steps", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--spec", help="a GpuTargetConfig text proto (default: an H200)")
    parser.add_argument("--top", type=int, default=15, help="the costliest op_names to list")
    parser.add_argument("--hlo", help="also write the compiled HLO text here")
    args = parser.parse_args()
    spec = H200
    if args.spec:
        with open(args.spec) as f:
            spec = f.read()
    compiled = compile_step(args, spec)
    hlo = compiled.as_text()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(hlo)
    memory = compiled.memory_analysis()
    bandwidth = float(re.search(r"memory_bandwidth: (\d+)", spec).group(1))
    rows = traffic(hlo)
    print(
        f"{args.model} {args.image_size} px, batch {args.batch}, {args.dtype}, {args.attention} "
        f"attention, {args.accum_steps} micro-batches: "
        f"temporaries {memory.temp_size_in_bytes / 2**30:.2f} GiB"
    )
    by_class: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    by_op: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    for r in rows:
        moved = (r["in"] + r["out"]) * r["times"]
        by_class[r["class"]][0] += r["times"]
        by_class[r["class"]][1] += moved
        if r["class"] not in ("gemm", "cudnn"):
            op = re.sub(r"encoderblock_\d+", "encoderblock_*", r["op_name"])
            by_op[r["class"], op][0] += r["times"]
            by_op[r["class"], op][1] += moved
    print(f"{'class':14s} {'runs':>6s} {'GB':>8s} {'ms at the bandwidth':>20s}")
    for cls, (n, b) in sorted(by_class.items(), key=lambda kv: -kv[1][1]):
        print(f"{cls:14s} {n:6d} {b / 1e9:8.2f} {b / bandwidth * 1e3:20.2f}")
    other = sum(b for cls, (_, b) in by_class.items() if cls not in ("gemm", "cudnn"))
    print(f"outside the products and attention: {other / 1e9:.2f} GB, "
          f"{other / bandwidth * 1e3:.2f} ms at {bandwidth / 1e12:.1f} TB/s")  # fmt: skip
    print(f"fusions that transpose: {sum(r['times'] for r in rows if '+T' in r['class'])} runs")
    for (cls, op), (n, b) in sorted(by_op.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"{b / 1e9:7.2f} GB {n:4d}  {cls:10s} {op}")


if __name__ == "__main__":
    main()
