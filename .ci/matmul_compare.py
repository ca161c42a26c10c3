"""Times a ViT's Dense products one at a time on the CPU, under XLA:CPU (`--lib jax`, as vit_jax runs
them) or under PyTorch (`--lib torch`, oneDNN's kernels, as timm runs them), for the README's
comparison of the two libraries' kernels. Not run by CI, and vit_jax does not depend on PyTorch:
run the torch half by hand where torch is installed, e.g.

    python .ci/matmul_compare.py --lib jax --dtype bfloat16
    python .ci/matmul_compare.py --lib torch --dtype bfloat16 --threads 2

The products are those of one CPU cache block (`--tokens` rows, 788 = four 224 px images): for each
`--models` variant, (tokens, D)·(D, 3D) as the query/key/value products together, (tokens, D)·(D, D),
(tokens, D)·(D, mlp_dim) and (tokens, mlp_dim)·(mlp_dim, D), then a (2048, 2048)·(2048, 2048) square.
Under jax a low-precision product is the model's (`models.mixed_dot_general`: a float32 result, then
rounded to the dtype, a separate pass on XLA:CPU); under torch it is `a @ b`, whose bfloat16 result
oneDNN writes directly. Prints one JSON object per product: shape, median ms and GFLOP/s (the best
of `--rounds` medians of `--steps` calls).
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable


def shapes(models: list[str], tokens: int) -> list[tuple[str, int, int, int]]:
    """(name, M, K, N) of each product: the Dense layers of `models` (variant names) on `tokens`
    rows, then the 2048 square."""
    from vit_jax.variants import VARIANTS

    rows, seen = [], set()
    for name in models:
        if name not in VARIANTS:
            raise SystemExit(f"error: unknown model {name!r}; one of: {', '.join(VARIANTS)}")
        d, mlp = VARIANTS[name]["hidden_size"], VARIANTS[name]["mlp_dim"]
        for what, k, n in (("qkv", d, 3 * d), ("out", d, d), ("mlp1", d, mlp), ("mlp2", mlp, d)):
            if (tokens, k, n) not in seen:
                seen.add((tokens, k, n))
                rows.append((f"{name} {what}", tokens, k, n))
    rows.append(("square", 2048, 2048, 2048))
    return rows


def median_s(call: Callable[[], object], steps: int, rounds: int) -> float:
    """The best of `rounds` medians of `steps` timed calls, after three untimed ones."""
    for _ in range(3):
        call()
    best = float("inf")
    for _ in range(rounds):
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        best = min(best, statistics.median(times))
    return best


def jax_product(m: int, k: int, n: int, dtype: str) -> Callable[[], object]:
    import jax
    import jax.numpy as jnp

    from vit_jax import models

    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32).astype(dt)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32).astype(dt)
    numbers = (((1,), (0,)), ((), ()))
    if dt == jnp.float32:
        f = jax.jit(lambda x, y: jax.lax.dot_general(x, y, numbers))
    else:
        f = jax.jit(lambda x, y: models.mixed_dot_general(x, y, numbers).astype(dt))
    return lambda: f(a, b).block_until_ready()


def torch_product(m: int, k: int, n: int, dtype: str) -> Callable[[], object]:
    import torch

    dt = getattr(torch, dtype)
    a, b = torch.randn(m, k).to(dt), torch.randn(k, n).to(dt)

    def call():
        with torch.inference_mode():
            return a @ b

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lib", choices=("jax", "torch"), default="jax")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--models", default="ViT-B_16,ViT-Ti_16", help="comma-separated variants")
    parser.add_argument("--tokens", type=int, default=788, help="rows of every Dense product")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, help="PyTorch's CPU threads")
    args = parser.parse_args()
    if args.lib == "torch" and args.threads:
        import torch

        torch.set_num_threads(args.threads)
    make = jax_product if args.lib == "jax" else torch_product
    for name, m, k, n in shapes(args.models.split(","), args.tokens):
        seconds = median_s(make(m, k, n, args.dtype), args.steps, args.rounds)
        row = {"lib": args.lib, "dtype": args.dtype, "product": name, "m": m, "k": k, "n": n}
        row |= {"ms": round(seconds * 1e3, 3), "gflops": round(2 * m * k * n / seconds / 1e9, 1)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
