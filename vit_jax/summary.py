"""Model summary: parameters per module, total, and forward GFLOPs per image.

python -m vit_jax.summary --model ViT-B_16 --image_size 224 [--num_classes 1000]
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.commands import interruptible, nonnegative_int, positive_int, prog
from vit_jax.models import VisionTransformer, get_model, image_hw, param_shapes
from vit_jax.variants import VARIANTS


def forward_gflops(
    model: VisionTransformer, image_size: int | Sequence[int] = 224, dtype: Any = jnp.float32
) -> float:
    """Forward-pass GFLOPs for one image, from XLA's cost analysis of the lowered (uncompiled) program.

    Counts every op XLA counts (a multiply-add is 2 FLOPs); matmuls and convolutions dominate. It is
    the forward pass as the model runs it: with a class-token head the last block computes the
    class token alone (`models.Encoder`'s `output_tokens`), 7 % fewer FLOPs for ViT-B/16 at 224 px
    than every block on every token.
    Rematerialisation is switched off for the count: XLA counts a loop's body once. Attention is
    counted in its einsum form whichever kernel the model runs: XLA counts nothing for cuDNN's
    (a custom call), which left ViT-B/16 at 384 px lowered for CUDA with 99.1 of its 111.6 GFLOPs.
    """
    model = model.clone(remat=False, attention="einsum")
    h, w = image_hw(image_size)
    # Lowered for the CPU whatever the default backend: the backends that PJRT plugins provide (CUDA,
    # TPU) analyse only compiled programs (`Lowered.cost_analysis` returns None there).
    # jax 0.12.1 deprecates constructing SingleDeviceSharding; jax 0.8 (the oldest allowed) lacks its
    # replacement.
    one_device = getattr(jax.sharding, "make_single_device_sharding", None)
    one_device = one_device or jax.sharding.SingleDeviceSharding
    try:
        on_cpu = one_device(jax.local_devices(backend="cpu")[0])
    except RuntimeError:  # JAX_PLATFORMS names no cpu
        on_cpu = None

    def spec(x: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_cpu)

    params = jax.tree.map(spec, param_shapes(model, (h, w)))
    images = spec(jax.ShapeDtypeStruct((1, h, w, 3), dtype))
    lowered = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False)).lower(params, images)
    cost = lowered.cost_analysis()
    if cost is None:  # no CPU backend: the compiled program's count, after XLA's optimisations
        cost = lowered.compile().cost_analysis()
    if isinstance(cost, list):  # older jax returned one dict per device
        cost = cost[0]
    return float(cost["flops"]) / 1e9


_ORDER = (
    "conv_root",
    "gn_root",
    "block",
    "embedding",
    "cls",
    "posembed_input",
    "encoderblock_",
    "encoder_norm",
    "pre_logits",
    "head",
)


def _forward_order(name: str) -> tuple:
    """Sort key putting modules in the order the forward pass uses them (block_2 before block_10)."""
    rank = next((i for i, p in enumerate(_ORDER) if name.startswith(p)), len(_ORDER))
    number = re.search(r"\d+$", name)
    return (rank, int(number.group()) if number else 0, name)


def param_table(params: Any) -> list[tuple[str, int]]:
    """(module path, parameter count) in forward order: top-level modules and each encoder block."""
    rows = []
    for name, sub in params.items():
        if name == "Transformer":
            rows += [(f"Transformer/{child}", _size(leaves)) for child, leaves in sub.items()]
        else:
            rows.append((name, _size(sub)))
    return sorted(rows, key=lambda row: _forward_order(row[0].removeprefix("Transformer/")))


def _size(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def summary(model: VisionTransformer, image_size: int | Sequence[int] = 224) -> str:
    """A printable table of parameters per module, the total, and forward GFLOPs per image."""
    h, w = image_hw(image_size)
    params = param_shapes(model, (h, w))
    rows = param_table(params)
    width = max(len(r[0]) for r in rows) + 2
    gh, gw = model.grid_size((h, w))
    lines = [
        f"VisionTransformer at {h}x{w}: {gh}x{gw} patches of {model.stride[0]}x{model.stride[1]} px, "
        f"hidden {model.hidden_size}, {model.num_layers} layers, {model.num_heads} heads, "
        f"classifier={model.classifier}, dtype={jnp.dtype(model.dtype).name}",
        f"{'module':<{width}}{'params':>14}",
        "-" * (width + 14),
    ]
    lines += [f"{name:<{width}}{count:>14,}" for name, count in rows]
    lines += [
        "-" * (width + 14),
        f"{'total':<{width}}{sum(c for _, c in rows):>14,}",
        f"forward GFLOPs per image: {forward_gflops(model, (h, w)):.2f}",
    ]
    return "\n".join(lines)


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog("vit_jax.summary"), description=__doc__.strip().splitlines()[0]
    )
    parser.add_argument(
        "--model",
        default="ViT-B_16",
        choices=list(VARIANTS),
        metavar="NAME",
        help=f"model name, one of: {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--image_size",
        type=positive_int,
        nargs="+",
        default=[224],
        help="H [W] in pixels (default 224)",
    )
    parser.add_argument(
        "--num_classes",
        type=nonnegative_int,
        default=1000,
        help="classes of the head; 0 leaves the head out",
    )
    args = parser.parse_args(argv)
    size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size[:2])
    model = get_model(args.model, num_classes=args.num_classes or None)
    try:
        print(summary(model, size))
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
