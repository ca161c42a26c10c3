"""Where the CPU time of a benchmark step goes, by sampling (Linux `perf`) rather than tracing.
Not run by CI: run it by hand on Linux with `perf` and `gdb` installed, e.g.

    python .ci/cpu_perf.py --model ViT-Ti_16 --image_size 224 --batch 32 --mode train

`python -m vit_jax.benchmark --profile` traces XLA:CPU's thunks, and that trace misses work: the
Eigen products (the weight gradients, attention's backward products) hand their blocks to oneDNN's
sgemm on the thread pool, outside the thunk that started them, so a training step's backward pass
looks a third idle when it is not. Sampling sees every thread. The script builds and times the
benchmark's step (`benchmark.run`, `--steps` of them), then runs more steps while `perf record`
samples this process at 999 Hz for `--seconds`, and names what ran: library symbols from `perf`,
oneDNN's generated kernels from the map it writes with ONEDNN_JIT_PROFILE=2, and XLA's compiled
kernels (the fusions) through `gdb`, which reads XLA's JIT registrations. It prints the step's
figures, how busy the cores were (samples against every core it may run on, for the whole time) and
the sampled CPU time by kind: products (YNNPACK's and Eigen/oneDNN's kernels, Eigen's packing),
XLA's fusions (transposes and copies apart), YNNPACK's other kernels, the kernel (page faults),
malloc and libc's memory copies, and the thread pools' own scheduling and waiting.

The process restarts itself once, with glibc's huge pages (as the vit_jax commands run) and oneDNN's
perf map turned on.
"""

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

SAMPLE_HZ = 999
RESTARTED = "VIT_JAX_CPU_PERF_RESTARTED"

# (kind, pattern on the symbol), first match wins; XLA's fusions are named by gdb (`jit_names`).
KINDS = (
    ("products: YNNPACK", re.compile(r"^ynn::dot_")),
    ("products: oneDNN (Eigen's)", re.compile(r"^jit_.*(gemm|gemv|brg|matmul|copy_[ab][nt]_kern)")),
    ("products: Eigen's packing", re.compile(r"gemm_pack|gebp_kernel|TensorContraction")),
    ("YNNPACK, other kernels", re.compile(r"^ynn::")),
    ("thread pools", re.compile(r"ThreadPool|RunQueue|EventCount|slinky::|ThunkExecutor|Worker::")),
    (
        "malloc, memcpy, memset",
        re.compile(r"malloc|_int_free|cfree|unlink_chunk|memmove|memset|memcpy"),
    ),
)
REPORT_LINE = re.compile(r"^\s*[\d.]+%\s+(\d+)\s+(.+?)\s+\[(.)\]\s+(.*?)\s*$")


def restart_environment() -> dict[str, str] | None:
    """This process's environment plus oneDNN's perf map and glibc's huge pages (where the commands
    would set them), or None once restarted."""
    if os.environ.get(RESTARTED):
        return None
    from vit_jax import commands

    env = commands.huge_pages_environment(
        os.environ, commands._thp_mode(), os.confstr("CS_GNU_LIBC_VERSION")
    ) or dict(os.environ)
    return {**env, "ONEDNN_JIT_PROFILE": "2", RESTARTED: "1"}


def sample(fn: Callable[[], Any], seconds: float, out_dir: str) -> tuple[int, str]:
    """Runs `fn` (one step, blocking) until `perf record` has sampled this process for `seconds`;
    returns the steps run and perf.data's path."""
    import jax

    data = os.path.join(out_dir, "perf.data")
    record = subprocess.Popen(
        ["perf", "record", "-F", str(SAMPLE_HZ), "-o", data, "-p", str(os.getpid()),
         "--", "sleep", str(seconds)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    steps = 0
    while record.poll() is None:
        jax.block_until_ready(fn())
        steps += 1
    if record.returncode:
        lines = record.stderr.read().strip().splitlines() or ["(no message)"]
        sys.exit(f"perf record failed: {lines[-1]} (see /proc/sys/kernel/perf_event_paranoid)")
    return steps, data


def report(data: str) -> list[tuple[int, str, bool, str]]:
    """perf's flat profile: (samples, object, in the kernel, symbol) per symbol."""
    text = subprocess.run(
        ["perf", "report", "-i", data, "--no-children", "-g", "none", "--sort", "dso,sym",
         "--stdio", "-n"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = []
    for line in text.splitlines():
        m = REPORT_LINE.match(line)
        if m and not line.lstrip().startswith("#"):
            rows.append((int(m[1]), m[2], m[3] == "k", m[4]))
    return rows


def jit_names(addresses: list[str]) -> dict[str, str]:
    """XLA's kernel name (e.g. `copy_bitcast_fusion`) for each address, from gdb attached to this
    process; addresses gdb cannot name are left out."""
    if not addresses:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".gdb") as script:
        script.write("set pagination off\n")
        script.writelines(f"info symbol {a}\n" for a in addresses)
        script.flush()
        out = subprocess.run(
            ["gdb", "-q", "-batch", "-p", str(os.getpid()), "-x", script.name],
            capture_output=True, text=True, timeout=600,
        ).stdout  # fmt: skip
    answers = [
        line for line in out.splitlines() if " in section " in line or line.startswith("No symbol")
    ]
    names = {}
    for address, answer in zip(addresses, answers, strict=False):
        m = re.match(r"(\S+) \+ \d+ in section", answer)
        if m:
            names[address] = m[1]
    return names


def kernel_name(name: str) -> str:
    """A kernel's name without XLA's numbering of its copies: `copy_bitcast_fusion.12` ->
    `copy_bitcast_fusion`."""
    return re.sub(r"[._]\d+$", "", name)


def kind_of(symbol: str, in_kernel: bool, fusion: str | None) -> str:
    if in_kernel:
        return "Linux kernel (page faults, scheduling)"
    if fusion is not None:
        if re.match(r"(copy|transpose)", kernel_name(fusion)):
            return "XLA fusions: copies and transposes"
        return "XLA fusions: the rest"
    for kind, pattern in KINDS:
        if pattern.search(symbol):
            return kind
    return "unnamed generated code" if symbol.startswith("0x") else "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-Ti_16")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mode", choices=("infer", "train"), default="train")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--steps", type=int, default=5, help="timed steps before the sampling")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long perf samples")
    parser.add_argument("--top", type=int, default=12, help="costliest symbols to list")
    args = parser.parse_args()

    missing = [tool for tool in ("perf", "gdb") if shutil.which(tool) is None]
    if missing or sys.platform != "linux":
        sys.exit(f"needs Linux with perf and gdb (missing: {', '.join(missing) or 'Linux'})")
    env = restart_environment()
    if env is not None:
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    from vit_jax import benchmark

    with tempfile.TemporaryDirectory() as out_dir:
        sampled = {}

        def perf_profile(fn, log_dir, steps=None):
            sampled["steps"], data = sample(fn, args.seconds, out_dir)
            sampled["rows"] = report(data)
            # Named while the compiled step is alive: XLA unregisters its kernels with it.
            generated = [s for _, obj, _, s in sampled["rows"] if obj.startswith("[JIT]")]
            sampled["fusions"] = jit_names([s for s in generated if s.startswith("0x")])

        benchmark.profile = perf_profile  # run() calls it after the timed steps
        try:
            result = benchmark.run(
                args.model, args.image_size, args.batch, args.mode, args.dtype, args.steps,
                profile_dir=out_dir,
            )  # fmt: skip
        except ValueError as e:  # an unknown model, a batch that does not divide, ...
            sys.exit(str(e))
        if "error" in result:
            sys.exit(result["error"])
        rows, fusions = sampled["rows"], sampled["fusions"]
    map_file = f"/tmp/perf-{os.getpid()}.map"  # oneDNN's, for perf report; no longer needed
    if os.path.exists(map_file):
        os.remove(map_file)

    total = sum(samples for samples, *_ in rows)
    if not total:
        sys.exit("perf recorded no samples of this process")
    samples_per_cpu = SAMPLE_HZ * args.seconds * len(os.sched_getaffinity(0))
    by_kind: collections.Counter = collections.Counter()
    by_symbol: collections.Counter = collections.Counter()
    for samples, _, in_kernel, symbol in rows:
        fusion = fusions.get(symbol)
        by_kind[kind_of(symbol, in_kernel, fusion)] += samples
        by_symbol[kernel_name(fusion or re.split(r"[(<]", symbol)[0])] += samples
    print(
        f"{args.model} {args.mode} {args.dtype} batch {args.batch} at {args.image_size}px: median "
        f"step {1000 * result['median_step_s']:.1f} ms, {result['percent_of_peak']:.1f} % of a "
        f"{result['peak_matmul_gflops']:.1f} GFLOP/s peak"
    )
    busy = 100 * total / samples_per_cpu
    print(
        f"sampled {args.seconds:g} s ({sampled['steps']} steps), cores busy {busy:.0f} %; CPU time:"
    )
    for kind, samples in by_kind.most_common():
        print(f"  {100 * samples / total:5.1f} %  {kind}")
    products = sum(v for k, v in by_kind.items() if k.startswith("products"))
    print(f"  {100 * products / total:5.1f} %  products, all kinds")
    print("costliest symbols (XLA's fusions by kernel, their copies together):")
    for name, samples in by_symbol.most_common(args.top):
        print(f"  {100 * samples / total:5.1f} %  {name}")
    if by_kind["unnamed generated code"] > total / 100:
        print("gdb named too few of XLA's kernels: can it attach here (ptrace_scope)?")


if __name__ == "__main__":
    main()
