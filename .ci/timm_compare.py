"""Times timm's Vision Transformer (PyTorch) on the step `python -m vit_jax.benchmark` times, for the
comparisons in the README's Benchmark section. Not run by CI, and vit_jax does not depend on PyTorch:
run it by hand where torch and timm are installed, alternating with the benchmark on the same
machine, e.g.

    python .ci/timm_compare.py --model ViT-B_16 --image_size 384 --batch 64 --mode train \
        --dtype bfloat16 --compile
    python -m vit_jax.benchmark --model ViT-B_16 --image_size 384 --batch 64 --mode train --json

Prints one JSON object: the median, fastest and slowest step, img/s, and the versions. The model is
timm's `vit_{tiny,small,base,large,huge}_patch{P}_224` of the same size, built at `--image_size`
with a 1000-class head and the dropout of vit_jax's variant. A training step is the benchmark's:
softmax cross-entropy in float32, gradients clipped to global norm 1, SGD with momentum 0.9.
bfloat16 runs under `torch.autocast`, as mixed precision in PyTorch usually does; inference runs
under `torch.inference_mode`. `--compile` puts the model through `torch.compile` (its first steps,
the compilation, are warm-up and not timed). On a CPU, `--threads` sets PyTorch's thread count.
"""

import argparse
import contextlib
import json
import statistics
import sys
import time

SIZE_NAMES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


def timm_name(variant: dict) -> str:
    """timm's name for a plain ViT of vit_jax's `variant` (a `variants.VARIANTS` entry)."""
    if (
        "resnet_layers" in variant
        or variant.get("classifier", "token") != "token"
        or variant["hidden_size"] not in SIZE_NAMES
    ):
        raise ValueError("only plain class-token ViTs (ViT-Ti_16 ... ViT-H_14) have a timm twin")
    patch = variant["patch_size"][0]
    return f"vit_{SIZE_NAMES[variant['hidden_size']]}_patch{patch}_224"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B_16", help="a vit_jax variant name")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mode", choices=("infer", "train"), default="infer")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--device", help="cuda or cpu (default: cuda where PyTorch sees a GPU)")
    parser.add_argument("--threads", type=int, help="PyTorch's CPU threads")
    args = parser.parse_args()

    import timm
    import torch
    import torch.nn.functional as F

    from vit_jax.variants import VARIANTS

    if args.model not in VARIANTS:
        sys.exit(f"unknown model {args.model!r}: use one of {', '.join(VARIANTS)}")
    try:
        name = timm_name(VARIANTS[args.model])
    except ValueError as e:
        sys.exit(f"{args.model}: {e}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(
        name,
        pretrained=False,
        img_size=args.image_size,
        num_classes=1000,
        drop_rate=VARIANTS[args.model].get("dropout_rate", 0.0),
    ).to(device)
    if args.compile:
        model = torch.compile(model)
    images = torch.rand(args.batch, 3, args.image_size, args.image_size, device=device) * 2 - 1
    labels = torch.zeros(args.batch, dtype=torch.long, device=device)
    if args.dtype == "bfloat16":
        autocast = lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    if args.mode == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast():
                model(images)

    else:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                logits = model(images)
            F.cross_entropy(logits.float(), labels).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    print(json.dumps({
        "model": args.model, "timm_model": name, "mode": args.mode, "dtype": args.dtype,
        "batch": args.batch, "image_size": args.image_size, "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "compile": args.compile, "steps": args.steps,
        "warmup_s": warmup_s, "median_step_s": median, "min_step_s": min(times),
        "max_step_s": max(times), "img_s": args.batch / median,
        "torch": torch.__version__, "timm": timm.__version__,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
