"""The Vision Transformer (Dosovitskiy et al., 2021) and its hybrid (ResNet stem) variants.

Every submodule is named explicitly so that the parameter tree is the key layout of the published
`ViT-*.npz` checkpoints, e.g. `Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel`
of shape (hidden, heads, hidden // heads). A published file maps onto `init` params with no renaming.

Images go in as NHWC floats in [-1, 1]; any H, W divisible by the (effective) patch size work.
Matrix products (Dense, Conv, attention) take `dtype` operands and accumulate in float32; parameters,
the residual stream, softmax, LayerNorm statistics and logits stay float32. A Dense layer's output
(bias, GELU) is float32 on XLA:CPU and `dtype` on GPUs and TPUs (`dot_general` says why). With
`dtype=jnp.bfloat16` that is the usual mixed-precision recipe, and the fast one on each backend.
"""

from __future__ import annotations

import functools
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import resnet
from vit_jax.commands import first_line
from vit_jax.variants import VARIANTS

Dtype = Any
Initializer = Callable[..., jax.Array]

CLASSIFIERS = ("token", "gap", "unpooled", "token_unpooled")
# The `attention` setting of the model: see `attention_path`.
ATTENTION = ("auto", "cudnn", "xla", "einsum")


def dot_general(dtype: Dtype) -> Callable[..., jax.Array]:
    """`lax.dot_general` for layers computing in `dtype`: operands in `dtype`, float32 accumulation.

    On GPU and TPU a plain product: `dtype` operands and result, accumulated in float32 inside the
    kernel, so the layer's output (bias, GELU, dropout) is `dtype` too, as in PyTorch's autocast and
    Flax's default. Against a float32 result this halves the bytes each product writes and the next
    elementwise pass reads: ViT-B/16 training steps at 384 px and batch 64 on an H200 took 8 % less
    time (70.4 -> 64.9 ms) and 22 % fewer temporaries (15.4 -> 12.1 GiB).
    On XLA:CPU a low-precision product gets a float32 result (`mixed_dot_general`): that is what lets
    XLA:CPU use its bfloat16 (AVX512-BF16 / AMX) matmul kernels; a plain bfloat16 dot is converted to
    float32 first and runs at the float32 rate. The float32 result also keeps the elementwise work
    that follows in float32, which XLA:CPU runs 3-4x faster than in bfloat16; the next matmul casts
    its input back to `dtype`. In the backward pass the float32 cotangent is rounded to `dtype`
    before the two transposed products, so they run on the same bfloat16 kernels instead of as
    float32 x bfloat16 products at the float32 rate.
    """
    if not mixed_products(dtype):
        return jax.lax.dot_general

    def f32_result(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, **kwargs: Any):
        del kwargs  # precision: these products always take the operands' own precision
        return mixed_dot_general(lhs, rhs, _hashable(dimension_numbers))

    return f32_result


def on_xla_cpu() -> bool:
    """Whether the default backend is XLA:CPU, for which `dot_general` and `dense_input` shape the
    low-precision products differently than for GPUs and TPUs."""
    return jax.default_backend() == "cpu"


def mixed_products(dtype: Dtype) -> bool:
    """Whether `dtype` layers multiply through `mixed_dot_general` (low-precision operands, float32
    result): on XLA:CPU, for every dtype but float32. `dot_general` and `dense_input` follow it."""
    return jnp.dtype(dtype) != jnp.float32 and on_xla_cpu()


def _hashable(dimension_numbers: Any) -> tuple:
    (lc, rc), (lb, rb) = dimension_numbers
    return (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))


def _einsum_subscripts(lhs_ndim: int, rhs_ndim: int, dimension_numbers: tuple) -> tuple[str, ...]:
    """Einsum subscripts (lhs, rhs, out) of `lax.dot_general(lhs, rhs, dimension_numbers)`."""
    (lc, rc), (lb, rb) = dimension_numbers
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    lhs = [next(letters) for _ in range(lhs_ndim)]
    rhs = [next(letters) for _ in range(rhs_ndim)]
    for i, j in zip((*lc, *lb), (*rc, *rb), strict=True):
        rhs[j] = lhs[i]
    out = [lhs[i] for i in lb]
    out += [lhs[i] for i in range(lhs_ndim) if i not in (*lc, *lb)]
    out += [rhs[j] for j in range(rhs_ndim) if j not in (*rc, *rb)]
    return "".join(lhs), "".join(rhs), "".join(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: tuple) -> jax.Array:
    """`lax.dot_general` of two low-precision operands with a float32 result, whose backward pass
    rounds the cotangent to the operands' dtype (the cotangent of a bfloat16 activation, as on TPU)
    and computes both transposed products the same way: low-precision operands, float32 result, then
    cast to each operand's dtype (on XLA:CPU a kernel's gradient computed transposed where that
    lays out fewer elements, and a batched product's rhs gradient, the attention's dK and dV, over
    a unit axis too: see `_mixed_dot_bwd`). `dimension_numbers` as for `lax.dot_general`, as nested
    tuples. With float32 operands it is a float32 product whose backward products need no
    transposes after them (JAX's own rule for `lax.dot_general` transposes dV); the attention uses
    it for that."""
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)


def _mixed_dot_fwd(lhs: jax.Array, rhs: jax.Array, dimension_numbers: tuple):
    return mixed_dot_general(lhs, rhs, dimension_numbers), (lhs, rhs)


def _mixed_dot_bwd(dimension_numbers: tuple, residuals: tuple, g: jax.Array):
    lhs, rhs = residuals
    ls, rs, out = _einsum_subscripts(lhs.ndim, rhs.ndim, dimension_numbers)
    g = g.astype(lhs.dtype)
    f32 = jnp.float32
    # jnp.einsum orders each product's operands so that it needs no transpose afterwards.
    d_lhs = jnp.einsum(f"{out},{rs}->{ls}", g, rhs, preferred_element_type=f32)
    (_, _), (batch, _) = dimension_numbers
    low_on_cpu = lhs.dtype != f32 and on_xla_cpu()  # (the einsum attention runs elsewhere too)
    if low_on_cpu and rhs.ndim == 2 and not batch and g.size + rhs.size < lhs.size:
        # A kernel's gradient, (in, tokens)·(tokens, out): XLA:CPU lays the activation out as
        # (in, tokens) first, and its low-precision transposes are slow (ViT-Ti/16's (788, 768) MLP
        # activation: 0.44 ms, the product 0.36 ms). Where the cotangent and the float32 result
        # hold fewer elements, the product is (out, tokens)·(tokens, in), which lays out the
        # cotangent instead, and its result is transposed: the whole gradient alone 1.7x faster for
        # ViT-Ti/16's shapes, 1.3x for ViT-S/16's; slower where the rule says no (ViT-B/16's and
        # ViT-L/16's at 4 images). The barrier keeps XLA from folding that transpose back into the
        # product, as one that XLA:CPU cannot run in bfloat16.
        d_rhs_t = jnp.einsum(f"{out},{ls}->{rs[::-1]}", g, lhs, preferred_element_type=f32)
        d_rhs = jax.lax.optimization_barrier(d_rhs_t).T
    elif low_on_cpu and batch:
        # The attention's dK and dV contract both operands' first axes after the batch axis, and
        # XLA:CPU converts such a product's bfloat16 operands to float32 (the float32 rate, and two
        # conversions of the (L, L) weights). A product over two contracting axes it rewrites as a
        # plain one, laying its operands out first, and that keeps them bfloat16: the unit axis in
        # front makes two (dV at ViT-Ti/16's shapes, 12 heads·images: 0.83 -> 0.50 ms alone).
        # That product lays out, transposed, the operand holding the result's first axis after
        # the batch axes: for dK and dV the (L, L) cotangent or weights. Where the other operand
        # and the float32 result hold fewer elements (L > 2 * head_dim), the result is computed
        # with its last two axes swapped and transposed after, as a kernel's gradient above
        # (ViT-Ti/16 bfloat16 training 3-5 % faster on jaxlib 0.10.2, level on 0.12).
        unit = next(c for c in "zyxwvutsrqponmlkjihgfedcba" if c not in ls + rs + out)
        nb = len(batch)
        laid_out, other = (g, lhs) if rs[nb] in out else (lhs, g)
        two_after_batch = dimension_numbers[1][1] == tuple(range(nb)) and rhs.ndim == nb + 2
        swap = two_after_batch and other.size + rhs.size < laid_out.size
        result = rs[:nb] + rs[nb:][::-1] if swap else rs
        d_rhs = jnp.einsum(
            f"{unit}{out},{unit}{ls}->{result}", g[None], lhs[None], preferred_element_type=f32
        )
        if swap:
            d_rhs = jnp.einsum(f"{result}->{rs}", jax.lax.optimization_barrier(d_rhs))
    else:
        d_rhs = jnp.einsum(f"{out},{ls}->{rs}", g, lhs, preferred_element_type=f32)
    return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype)


mixed_dot_general.defvjp(_mixed_dot_fwd, _mixed_dot_bwd)


def use_fused_attention() -> bool:
    """Whether `jax.nn.dot_product_attention` is the faster kernel on the default backend.

    True on GPU (cuDNN flash attention, see `fused_attention_implementation`) and TPU. On XLA:CPU two
    einsums in the (N, heads, L, head_dim) layout are ~2x faster than the fused op, which transposes
    its (N, L, heads, head_dim) operands (benchmark: 30 -> 17 ms per ViT-B/16 attention at batch 8).
    """
    return jax.default_backend() != "cpu"


def cuda_compute_capability(device: Any) -> tuple[int, int] | None:
    """(major, minor) of an NVIDIA GPU, e.g. (9, 0) for an H100/H200; None for any other device
    (CPU, TPU, and ROCm GPUs, which name their architecture gfx...)."""
    if device.platform != "gpu":
        return None
    try:
        major, minor = (int(x) for x in str(device.compute_capability).split(".")[:2])
    except (AttributeError, ValueError):
        return None
    return major, minor


def default_compute_dtype(device: Any = None) -> jnp.dtype:
    """The compute dtype that `dtype="auto"` (training's default) picks for `device` (default: the
    first local device, which every process of a multi-host run has the same kind of).

    bfloat16 on TPUs and on NVIDIA GPUs of compute capability 8.0 (A100) or newer, whose matrix units
    run it at several times the float32 rate and where it brings cuDNN's flash attention; float32 on
    CPUs (bfloat16 is fast only on those with AVX512-BF16 or AMX, and a CPU run's numbers should not
    depend on which one it landed on), older NVIDIA GPUs and ROCm GPUs.
    """
    device = device or jax.local_devices()[0]
    capability = cuda_compute_capability(device)
    if device.platform == "tpu" or (capability is not None and capability >= (8, 0)):
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(jnp.float32)


def fused_attention_implementation(dtype: Dtype, head_dim: int) -> str | None:
    """The `implementation` to ask `jax.nn.dot_product_attention` for: "cudnn" (cuDNN's flash
    attention) on NVIDIA GPUs of compute capability 8.0 (Ampere) or newer, for bfloat16 or float16
    operands whose head dim is a multiple of 8, at most 128 (256 from 9.0, Hopper, on); else None.

    None is XLA's attention: JAX does not pick cuDNN by itself (as of 0.10, `implementation=None`
    means XLA on GPU too), and cuDNN's kernel takes no float32 operands.
    """
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) or head_dim % 8:
        return None
    capability = cuda_compute_capability(jax.local_devices()[0])
    if capability is None or capability < (8, 0):
        return None
    if head_dim > (256 if capability >= (9, 0) else 128):
        return None
    return "cudnn"


def attention_path(attention: str, dtype: Dtype, head_dim: int) -> str:
    """The attention that a layer computing in `dtype`, with heads of `head_dim`, runs for the
    setting `attention` (one of `ATTENTION`): "cudnn", "xla" or "einsum".

    "auto" is "einsum" on XLA:CPU (`use_fused_attention`), "cudnn" where
    `fused_attention_implementation` allows it, else "xla" (`jax.nn.dot_product_attention` in XLA's
    form). "cudnn" asked for where cuDNN's flash attention cannot run raises ValueError. Whatever is
    asked, attention maps and attention dropout use the einsum form, which forms the weights.
    """
    if attention not in ATTENTION:
        raise ValueError(f"unknown attention={attention!r}; expected one of {', '.join(ATTENTION)}")
    if attention == "auto":
        if not use_fused_attention():
            return "einsum"
        return fused_attention_implementation(dtype, head_dim) or "xla"
    if attention == "cudnn" and fused_attention_implementation(dtype, head_dim) is None:
        raise ValueError(
            f"attention='cudnn' needs an NVIDIA GPU of compute capability 8.0 or newer and bfloat16 "
            f"or float16 compute with a head dim that is a multiple of 8, at most 128 (256 from 9.0); "
            f"this is {jax.local_devices()[0].device_kind} with {jnp.dtype(dtype).name} compute and "
            f"head dim {head_dim}: use attention='auto' or 'xla'"
        )
    return attention


def layer_attention(
    attention: str,
    dtype: Dtype,
    head_dim: int,
    *,
    dropout: bool,
    keep_weights: bool,
    few_queries: bool = False,
) -> str:
    """The attention one layer's call runs: `attention_path`'s, except "einsum" for a call with
    attention dropout (`dropout`) or one that keeps the attention weights (`keep_weights`), which only
    the einsum form forms, and "xla" instead of "cudnn" for a call where only a few tokens ask
    queries (`few_queries`: JAX cannot differentiate cuDNN's at an odd number of queries, and a few
    gain nothing from flash attention)."""
    path = attention_path(attention, dtype, head_dim)
    if dropout or keep_weights:
        return "einsum"
    return "xla" if few_queries and path == "cudnn" else path


def fused_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cudnn: bool = False,
    required: bool = False,
    kv_length: int | None = None,
) -> jax.Array:
    """`jax.nn.dot_product_attention` of (N, L, heads, head_dim) operands: cuDNN's flash attention
    when `cudnn` (an odd L padded to an even one, see `even_length_attention`), else XLA's. If cuDNN
    refuses the call when it is traced (no cuDNN found, a version without these shapes), XLA's
    attention is used, with a warning, unless `required` (ValueError).

    `kv_length`: the tokens from this index on are padding, which no query attends to (a padding
    mask); the caller has made L even with them (`Encoder` does, for cuDNN), so none is added here.
    """
    lengths = None if kv_length is None else jnp.full((q.shape[0],), kv_length, jnp.int32)
    if cudnn:
        try:
            return even_length_attention(q, k, v, lengths, implementation="cudnn")
        except (NotImplementedError, RuntimeError, ValueError) as e:
            reason = first_line(e) or type(e).__name__
            if required:
                raise ValueError(
                    f"attention='cudnn': cuDNN refused this call ({reason}); "
                    "use attention='auto' or 'xla'"
                ) from None
            warnings.warn(
                f"cuDNN attention is not available here ({reason}); "
                "using XLA's attention, which is slower on GPU",
                RuntimeWarning,
                stacklevel=2,
            )
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)


def even_length_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_value_seq_lengths: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """`jax.nn.dot_product_attention` of (N, L, heads, head_dim) operands, with an odd L padded by one
    zero token that no query attends to (a padding mask: `key_value_seq_lengths`, (N,) int32, L
    unless given, and at most L), and the padded query's row dropped from the (N, L, heads, head_dim)
    result. An even L is passed through as it is.

    JAX's cuDNN attention (0.8 to 0.12 at least) refuses to be differentiated for odd sequence
    lengths ("Unsupported sequence length Q 197, KV 197."): its gradient rule applies a check meant
    for attention biases to every call, biasless ones too. A class token makes every ViT's
    length odd at the usual sizes (197 tokens at 224 px, 577 at 384 px). `Encoder` pads the whole
    sequence once instead, which spares the copies of q, k, v and the result in every layer; this
    covers the attention module called on its own.
    """
    n, length = q.shape[0], q.shape[1]
    attend = functools.partial(jax.nn.dot_product_attention, implementation=implementation)
    if length % 2 == 0:
        return attend(q, k, v, key_value_seq_lengths=key_value_seq_lengths)
    if key_value_seq_lengths is None:
        key_value_seq_lengths = jnp.full((n,), length, jnp.int32)
    pad = ((0, 0), (0, 1), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, pad) for t in (q, k, v))
    return attend(q, k, v, key_value_seq_lengths=key_value_seq_lengths)[:, :length]


def image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) from an image size given as an int (square) or an (H, W) pair; ValueError if not > 0."""
    if isinstance(image_size, int):
        h = w = image_size
    else:
        h, w = (int(x) for x in image_size)
    if h < 1 or w < 1:
        raise ValueError(f"image size {h}x{w}: height and width must be positive")
    return h, w


def sum_rows(rows: jax.Array) -> jax.Array:
    """(n, F) -> (F,): the sum over the leading axis in float32, as elementwise adds of rows.

    XLA:CPU's reduction over a short leading axis with a long result is slow: (4, 197 * 192)
    float32 rows take 0.97 ms that way and 0.10 ms as adds; (8, 577 * 768) 16.0 ms and 0.45 ms.
    Rows are halved pairwise down to 8, whose adds XLA fuses into one pass.
    """
    rows = rows.astype(jnp.promote_types(rows.dtype, jnp.float32))
    while rows.shape[0] > 8:
        half = rows.shape[0] // 2
        rows = jnp.concatenate([rows[:half] + rows[half : 2 * half], rows[2 * half :]])
    return functools.reduce(jnp.add, list(rows))


@jax.custom_vjp
def add_position_embedding(x: jax.Array, pe: jax.Array) -> jax.Array:
    """`x + pe`: (N, L, D) tokens plus a float32 (1, L, D) position embedding, in `x`'s dtype. The
    same numbers and gradients as the plain sum, except that the gradient of `pe` (the tokens'
    cotangent summed over the batch) is summed in float32 whatever `x`'s dtype, over a flat (N, L*D)
    view behind an optimization barrier: one reduction, on XLA:CPU adds of rows (`sum_rows`).

    Through the plain sum, XLA's GPU layout assignment lays that reduction's operand out batch-minor
    (the reduced axis fastest-varying), and the choice spreads along the residual stream: every
    block's residual adds and LayerNorms then run on (L, D, N) float32 arrays, transposed to and from
    the (N, L, D) ones the matmuls read (seen in profiles of the step on an H200). With the barrier
    and the flat view (either one alone does not do it), ViT-B/16's bfloat16 training step at 384 px,
    batch 64, compiled for an H200 (`.ci/gpu_hlo.py`), has none of those transposes and its
    non-matmul fusions move 54.6 GB per step instead of 72.3.
    """
    return x + pe.astype(x.dtype)


def _add_position_embedding_fwd(x: jax.Array, pe: jax.Array) -> tuple[jax.Array, None]:
    return add_position_embedding(x, pe), None


def _add_position_embedding_bwd(_: None, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    # The barrier keeps this reduction's layout preference from reaching g (see the docstring).
    n = g.shape[0]
    rows = jax.lax.optimization_barrier(g.reshape(n, -1))
    g_pe = sum_rows(rows) if on_xla_cpu() else rows.sum(axis=0, dtype=jnp.float32)
    return g, g_pe.reshape(1, *g.shape[1:])


add_position_embedding.defvjp(_add_position_embedding_fwd, _add_position_embedding_bwd)


class AddPositionEmbs(nn.Module):
    """Adds a learnt position embedding `pos_embedding` of shape (1, L, D) to (N, L, D) inputs
    (`add_position_embedding`)."""

    posemb_init: Initializer = nn.initializers.normal(stddev=0.02)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pe = self.param("pos_embedding", self.posemb_init, (1, *x.shape[1:]), jnp.float32)
        return add_position_embedding(x, pe)


class PatchEmbedding(nn.Module):
    """Non-overlapping patches -> linear projection: (N, H, W, C) -> (N, H/ph, W/pw, features) float32.

    The same as `nn.Conv(features, patch_size, strides=patch_size, padding='VALID')` with the same
    `kernel` (ph, pw, C, features) and `bias`, written as one matmul so that it runs on the same
    (bfloat16-capable) matmul kernels as the rest of the model.
    """

    features: int
    patch_size: tuple[int, int]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.patch_size
        n, h, w, c = x.shape
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (ph, pw, c, self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        gh, gw = h // ph, w // pw
        patches = x.reshape(n, gh, ph, gw, pw, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(n, gh, gw, ph * pw * c).astype(self.dtype)
        y = dot_general(self.dtype)(
            patches,
            kernel.reshape(ph * pw * c, self.features).astype(self.dtype),
            (((3,), (0,)), ((), ())),
        )
        return y + bias.astype(jnp.float32)


def _fold(rng: jax.Array | None, i: int) -> jax.Array | None:
    """The i-th key derived from `rng`, or None (the Dropout then draws from the `dropout` rng)."""
    return None if rng is None else jax.random.fold_in(rng, i)


def dense_input(x: jax.Array, dtype: Dtype, feature_axes: int = 1) -> jax.Array:
    """A Dense layer's input (..., *features) as (tokens, *features), every leading axis merged into
    one (a reshape, no copy); on XLA:CPU only for float32 layers, other dtypes' inputs as they are.

    A Dense layer applied to (N, L, D) has a weight gradient that contracts two axes (N and L) of its
    input and its output's cotangent. XLA:CPU makes such a product 2-D by copying one operand
    transposed (for the MLP's first layer, its (N*L, mlp_dim) cotangent: a strided pass over the
    block's largest activation). On (N*L, D) operands the product contracts one axis and XLA:CPU
    reads both in place: the same numbers, ViT-Ti/16 float32 training steps 1.5-6 % faster (the
    most when other processes load the memory system).
    bfloat16 layers keep their leading axes on XLA:CPU: it sends a 2-D bfloat16 product with a
    float32 result that contracts both operands' first axes to a kernel without bfloat16
    (`Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32` when the step runs).
    GPUs and TPUs get (tokens, features) in every dtype, 2-D products as their matmul kernels take
    them. On an H200 (ViT-B/16 bfloat16 training at 384 px, batch 64) the step ran as fast either way
    (64.8 against 64.9 ms, two sessions); with float32 product results it was 4.5 % faster flattened
    (69.2 -> 66.1 ms, fewer transposes of the token stream).
    """
    if mixed_products(dtype):
        return x
    lead = x.shape[: x.ndim - feature_axes]
    return x.reshape(int(np.prod(lead, dtype=np.int64)), *x.shape[x.ndim - feature_axes :])


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """`nn.gelu` with the tanh approximation, as the reference's MLP blocks use it, whose backward pass
    keeps only `x` and recomputes the tanh from it. Any shape in, the same shape and dtype out; the
    forward pass is `nn.gelu`'s, bit for bit.

    Through `nn.gelu`, XLA keeps the tanh of every MLP activation until the backward pass: one more
    (tokens, mlp_dim) array per block. Recomputing it costs one tanh per element, and the step runs
    as fast as before, with 13-14 % fewer temporaries on XLA:CPU (ViT-Ti/16 float32 training at batch
    32: 0.41 -> 0.35 GiB; ViT-B/16 bfloat16 at batch 8: 1.65 -> 1.44 GiB).
    """
    return nn.gelu(x, approximate=True)


def _gelu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return gelu(x), x


def _gelu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    # d/dx of x/2 * (1 + tanh(u)), u = sqrt(2/pi) * (x + 0.044715 x^3), in float32 at least.
    dtype = x.dtype
    # The barrier keeps XLA from merging this tanh with the forward pass's (common subexpression
    # elimination), which would keep that tanh alive until here again.
    x = jax.lax.optimization_barrier(x).astype(jnp.promote_types(dtype, jnp.float32))
    c, a = np.sqrt(2 / np.pi).astype(x.dtype), 0.044715
    t = jnp.tanh(c * (x + a * x**3))
    slope = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * a * x * x)
    return ((g * slope).astype(dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class MlpBlock(nn.Module):
    """Dense -> GELU -> dropout -> Dense -> dropout: (N, L, D) -> (N, L, out_dim or D)."""

    mlp_dim: int
    out_dim: int | None = None
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, *, deterministic: bool, rng: jax.Array | None = None
    ) -> jax.Array:
        dense = functools.partial(
            nn.Dense,
            dtype=self.dtype,
            dot_general=dot_general(self.dtype),
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
        )
        shape = x.shape
        x = dense_input(x, self.dtype)
        y = dense(self.mlp_dim, name="Dense_0")(x)
        y = gelu(y)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic, rng=_fold(rng, 0))
        y = dense(self.out_dim or x.shape[-1], name="Dense_1")(y)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic, rng=_fold(rng, 1))
        return y.reshape(*shape[:-1], y.shape[-1])


class Projection(nn.Module):
    """`nn.DenseGeneral` over the last `in_axes` axes, with its parameters (`kernel` of shape
    (*in_features, *features), `bias` of shape `features`, the same initial values), that returns
    its product and its bias apart, for the caller to add or leave out.

    (..., *in_features) -> the product (..., *features), of `dtype` operands as `dot_general(dtype)`
    computes it, and the float32 bias (*features). `shift`, a (*in_features) bias of the input, is
    carried through the kernel into the returned bias (in float32): the layer applied to `x + shift`
    is the product of `x` plus that bias.
    """

    features: tuple[int, ...]
    in_axes: int = 1
    dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.xavier_uniform()
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array, shift: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        in_features = x.shape[x.ndim - self.in_axes :]
        fan_in, fan_out = int(np.prod(in_features)), int(np.prod(self.features))

        # As nn.DenseGeneral: initialised as a 2-D (fan_in, fan_out) kernel, reshaped.
        def kernel_init(rng: jax.Array, shape: tuple[int, ...], dtype: Dtype) -> jax.Array:
            return self.kernel_init(rng, (fan_in, fan_out), dtype).reshape(shape)

        def bias_init(rng: jax.Array, shape: tuple[int, ...], dtype: Dtype) -> jax.Array:
            return self.bias_init(rng, (fan_out,), dtype).reshape(shape)

        kernel = self.param("kernel", kernel_init, (*in_features, *self.features), jnp.float32)
        bias = self.param("bias", bias_init, self.features, jnp.float32)
        kernel_in = tuple(range(self.in_axes))  # the kernel's input axes
        y = dot_general(self.dtype)(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            ((tuple(range(x.ndim - self.in_axes, x.ndim)), kernel_in), ((), ())),
        )
        if shift is not None:
            bias = bias + jax.lax.dot_general(
                shift,
                kernel,
                ((kernel_in, kernel_in), ((), ())),
                precision=jax.lax.Precision.HIGHEST,
            )
        return y, bias


def add_bias(y: jax.Array, bias: jax.Array, dtype: Dtype) -> jax.Array:
    """`y + bias` with the bias cast to the layer's compute `dtype` first, as flax's Dense layers
    add theirs."""
    return y + bias.astype(dtype)


class MultiHeadDotProductAttention(nn.Module):
    """Self-attention with the parameter layout of `flax.linen.MultiHeadDotProductAttention`.

    (N, L, D) -> (N, L, D). `query`/`key`/`value` kernels are (D, heads, D // heads), `out` is
    (heads, D // heads, D). The attention weights (N, heads, L, L) are computed in float32 and kept
    only when the caller makes the `intermediates` collection mutable (sown as
    `intermediates/.../attention_weights`). Without that, and without attention dropout, `attention`
    picks the kernel (`attention_path`): by default the fused `jax.nn.dot_product_attention` on
    GPU/TPU (cuDNN flash attention on GPU in bfloat16/float16) and two einsums on CPU.

    `kv_length` (fused kernels only): the tokens from this index on are padding that no query
    attends to; their rows of the output are computed but mean nothing.

    `query_tokens`: only the first `query_tokens` tokens ask queries, all L give keys and values;
    the output is then (N, query_tokens, D). XLA's attention stands in for cuDNN's there
    (`layer_attention`'s `few_queries`).

    Two of the four biases are not added where the reference adds them, with the same result up to
    float rounding. The key bias adds q . b_k to every logit of a query, the same for all its keys,
    which the softmax cancels: it is left out (its gradient is zero, as it is exactly in the
    reference's math). The attention's weights over the keys sum to 1, so the value bias reaches the
    output unchanged, as b_v . W_out: it joins the out layer's bias instead (`Projection`'s
    `shift`), except under attention dropout, whose weights do not sum to 1. That spares two
    elementwise passes over (N, L, D) activations forward and two bias-gradient reductions backward
    per block (ViT-B/16 bfloat16 training at 384 px, batch 64, compiled for an H200 by
    `.ci/gpu_hlo.py`: 54.6 -> 50.9 GB per step outside the products and attention).
    """

    num_heads: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        deterministic: bool,
        rng: jax.Array | None = None,
        kv_length: int | None = None,
        query_tokens: int | None = None,
    ) -> jax.Array:
        features = x.shape[-1]
        if features % self.num_heads:
            raise ValueError(
                f"hidden size {features} is not divisible by num_heads={self.num_heads}"
            )
        head_dim = features // self.num_heads
        proj = functools.partial(Projection, features=(self.num_heads, head_dim), dtype=self.dtype)
        lead = x.shape[:-1]  # (N, L)
        tokens = dense_input(x, self.dtype)  # (N*L, D) unless mixed_products: see dense_input
        asking = tokens if query_tokens is None else dense_input(x[:, :query_tokens], self.dtype)
        out_lead = lead if query_tokens is None else (lead[0], query_tokens)
        q, q_bias = proj(name="query")(asking)
        q = add_bias(q, q_bias, self.dtype).reshape(*out_lead, self.num_heads, head_dim)
        k, _ = proj(name="key")(tokens)  # its bias cancels in the softmax (see the docstring)
        k = k.reshape(*lead, self.num_heads, head_dim)
        v, v_bias = proj(name="value")(tokens)

        use_dropout = not deterministic and self.dropout_rate > 0.0
        # The value bias goes through the out layer, unless dropout breaks the weights' unit sums.
        if use_dropout:
            v, v_shift = add_bias(v, v_bias, self.dtype), None
        else:
            v_shift = v_bias
        v = v.reshape(*lead, self.num_heads, head_dim)
        keep_weights = self.is_mutable_collection("intermediates")
        path = layer_attention(
            self.attention,
            self.dtype,
            head_dim,
            dropout=use_dropout,
            keep_weights=keep_weights,
            few_queries=query_tokens is not None,
        )
        if path != "einsum":
            y = fused_attention(
                *(t.astype(self.dtype) for t in (q, k, v)),
                cudnn=path == "cudnn",
                required=self.attention == "cudnn",
                kv_length=kv_length,
            )
        else:
            if kv_length is not None:
                raise ValueError(
                    "kv_length (padding tokens) is for the fused attention kernels only"
                )
            # (N, heads, L, head_dim): batched matmuls over contiguous heads, no transposes.
            q = q / np.sqrt(head_dim).astype(q.dtype)
            q, k, v = (jnp.swapaxes(t, -3, -2).astype(self.dtype) for t in (q, k, v))
            heads_lead = q.shape[:-2]  # (N, heads)
            if mixed_products(self.dtype):
                # XLA:CPU makes the heads-major swap a layout of the (N, L, heads, head_dim)
                # array, and converts a bfloat16 product's operands in such a layout to float32
                # (the float32 rate); merged into one N*heads axis, they are bfloat16 copies.
                q, k, v = (t.reshape(-1, *t.shape[-2:]) for t in (q, k, v))
            # In float32 too: its backward products need no transposes after them (see its docstring).
            dot = mixed_dot_general
            batch = tuple(range(q.ndim - 2))
            logits = dot(q, k, (((q.ndim - 1,), (q.ndim - 1,)), (batch, batch)))  # qd,kd->qk
            pv = (((q.ndim - 1,), (q.ndim - 2,)), (batch, batch))  # qk,kd->qd
            if use_dropout or keep_weights:
                weights = jax.nn.softmax(logits, axis=-1).reshape(*heads_lead, *logits.shape[-2:])
                if keep_weights:
                    self.sow("intermediates", "attention_weights", weights)
                weights = nn.Dropout(self.dropout_rate)(
                    weights, deterministic=not use_dropout, rng=rng
                )
                y = dot(weights.reshape(logits.shape).astype(self.dtype), v, pv)
            else:
                # Softmax normalised after the product, as flash attention does: the division runs
                # over (L, head_dim) outputs instead of (L, L) weights (ViT-B/16 inference ~6 %
                # faster on XLA:CPU).
                e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
                y = dot(e.astype(self.dtype), v, pv) / e.sum(axis=-1, keepdims=True)
            y = y.reshape(*heads_lead, *y.shape[-2:])
            y = jnp.swapaxes(y, -3, -2)  # (N, heads, L, head_dim) -> (N, L, heads, head_dim)

        y, out_bias = Projection(features=(features,), in_axes=2, dtype=self.dtype, name="out")(
            dense_input(y, self.dtype, feature_axes=2), shift=v_shift
        )
        return add_bias(y, out_bias, self.dtype).reshape(*out_lead, features)


class Encoder1DBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)). (N, L, D) -> (N, L, D).

    `rng`, when given, is the key of all this block's dropout masks (else they come from the
    `dropout` rng collection). `kv_length`: see `MultiHeadDotProductAttention`. `query_tokens`: only
    the first `query_tokens` tokens' outputs are computed, (N, query_tokens, D); every token still
    gives keys and values to their attention.
    """

    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        deterministic: bool,
        rng: jax.Array | None = None,
        kv_length: int | None = None,
        query_tokens: int | None = None,
    ) -> jax.Array:
        x = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_0")(inputs)
        x = MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            dropout_rate=self.attention_dropout_rate,
            dtype=self.dtype,
            attention=self.attention,
            name="MultiHeadDotProductAttention_1",
        )(
            x,
            deterministic=deterministic,
            rng=_fold(rng, 0),
            kv_length=kv_length,
            query_tokens=query_tokens,
        )
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic, rng=_fold(rng, 1))
        x = x + (inputs if query_tokens is None else inputs[:, :query_tokens])
        y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_2")(x)
        y = MlpBlock(
            mlp_dim=self.mlp_dim,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            name="MlpBlock_3",
        )(y, deterministic=deterministic, rng=_fold(rng, 2))
        return x + y


class Encoder(nn.Module):
    """Position embedding + `num_layers` blocks + final LayerNorm. (N, L, D) -> (N, L, D) float32,
    or (N, output_tokens, D) when `output_tokens` is given: the last block then computes only the
    first `output_tokens` tokens' outputs (their attention still reads every token), the same
    numbers up to float rounding. A class-token classifier needs one, which spares it most of a
    block's work (ViT-B/16 at 224 px: 7 % of the forward FLOPs).

    `remat=True` makes training passes (`train=True`) recompute each block's activations in the
    backward pass: less memory, ~1/3 more compute, the same numbers up to float rounding. The blocks
    then run as one `lax.scan` over their stacked parameters, each step under `jax.checkpoint`, so the
    backward pass recomputes and frees one block at a time. (Checkpointing the unrolled blocks saved
    nothing on XLA:CPU: the compiled step's temporaries stayed the same size.) Either way block i's
    dropout masks come from key i of the `dropout` rng split per layer, so remat draws the same masks.
    The parameter tree keeps the published per-block names either way.

    Where the blocks run cuDNN's attention on an odd number of tokens (every class-token model at the
    usual sizes), the sequence gets one zero token at the end for the blocks and loses it after them:
    JAX cannot differentiate cuDNN's attention at odd lengths (`even_length_attention`), and one pad
    here spares every layer its own copies of q, k, v and the result. No query attends to that token
    (a padding mask), so the real tokens' outputs are unchanged; dropout draws its masks at the
    padded shape.
    """

    num_layers: int
    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, output_tokens: int | None = None) -> jax.Array:
        x = AddPositionEmbs(name="posembed_input")(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        length = x.shape[1]
        path = layer_attention(
            self.attention,
            self.dtype,
            x.shape[-1] // self.num_heads,
            dropout=train and self.attention_dropout_rate > 0,
            keep_weights=self.is_mutable_collection("intermediates"),
        )
        kv_length = length if length % 2 and path == "cudnn" else None
        if kv_length is not None:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
        block = functools.partial(
            Encoder1DBlock,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            dtype=self.dtype,
            attention=self.attention,
        )
        scanned = (
            self.remat
            and train
            and not self.is_initializing()
            and not self.is_mutable_collection("intermediates")
        )
        use_rng = train and (self.dropout_rate > 0 or self.attention_dropout_rate > 0)
        keys = jax.random.split(self.make_rng("dropout"), self.num_layers) if use_rng else None
        if not scanned:
            for i in range(self.num_layers):
                key = None if keys is None else keys[i]
                last = i == self.num_layers - 1
                x = block(name=f"encoderblock_{i}")(
                    x, not train, key, kv_length, output_tokens if last else None
                )
        else:
            x = self._scanned_blocks(
                block(parent=None), x, not train, keys, kv_length, output_tokens
            )
        if x.shape[1] > length:
            x = x[:, :length]
        return nn.LayerNorm(name="encoder_norm")(x.astype(jnp.float32))

    def _scanned_blocks(
        self,
        block: nn.Module,
        x: jax.Array,
        deterministic: bool,
        keys: jax.Array | None,
        kv_length: int | None,
        output_tokens: int | None,
    ) -> jax.Array:
        """All blocks as `scan(checkpoint(block))` over their parameters, stacked on a new axis 0,
        and their dropout keys (None: no dropout); with `output_tokens` the last block runs after
        the scan, on its own (it computes fewer outputs)."""
        params = self.variables["params"]
        per_block = [params[f"encoderblock_{i}"] for i in range(self.num_layers)]

        @functools.partial(jax.checkpoint, static_argnums=(3,))
        def apply_block(
            p: Any, y: jax.Array, key: jax.Array | None, query_tokens: int | None
        ) -> jax.Array:
            return block.apply({"params": p}, y, deterministic, key, kv_length, query_tokens)

        def step(y: jax.Array, layer: tuple[Any, jax.Array | None]) -> tuple[jax.Array, None]:
            p, key = layer
            return apply_block(p, y, key, None), None

        scanned = self.num_layers - (output_tokens is not None)
        if scanned:
            stacked = jax.tree.map(lambda *p: jnp.stack(p), *per_block[:scanned])
            x, _ = jax.lax.scan(step, x, (stacked, None if keys is None else keys[:scanned]))
        if output_tokens is not None:
            x = apply_block(per_block[-1], x, None if keys is None else keys[-1], output_tokens)
        return x


def is_int_at_least(value: Any, least: int) -> bool:
    """Whether `value` is an integer (a Python or NumPy one, not a bool) of at least `least`."""
    if isinstance(value, bool):
        return False
    try:
        return operator.index(value) >= least
    except TypeError:
        return False


class VisionTransformer(nn.Module):
    """ViT: (N, H, W, 3) images in [-1, 1] -> (N, num_classes) float32 logits.

    With `classifier='unpooled'` or `'token_unpooled'` the output keeps the sequence axis:
    (N, L, num_classes), L = number of patches (+1 for the class token). With `num_classes=None` the
    head is left out and the (pre-)logits features are returned.

    The "token" classifier reads the class token alone, so its last block computes that token's
    output only (`Encoder`'s `output_tokens`; not when the call keeps intermediates, whose attention
    maps need every query): the logits of the full block, 7 % fewer FLOPs for ViT-B/16 at 224 px.

    Attributes mirror the reference's model configs; see `vit_jax.variants.VARIANTS` for the
    published sizes and `get_model` to build one by name. `dtype`, `remat` and `attention` (the
    attention kernel, `attention_path`) change how it computes, not its parameters.
    """

    num_classes: int | None
    patch_size: tuple[int, int] = (16, 16)
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    classifier: str = "token"
    representation_size: int | None = None
    resnet_layers: Sequence[int] | None = None
    resnet_width_factor: float = 1.0
    head_bias_init: float = 0.0
    dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.classifier not in CLASSIFIERS:
            raise ValueError(
                f"unknown classifier={self.classifier!r}; expected one of {', '.join(CLASSIFIERS)}"
            )
        if self.attention not in ATTENTION:
            raise ValueError(
                f"unknown attention={self.attention!r}; expected one of {', '.join(ATTENTION)}"
            )
        sizes = {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "patch_size": self.patch_size,
        }
        for name, value in sizes.items():
            if not all(is_int_at_least(v, 1) for v in np.atleast_1d(value).tolist()):
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.representation_size is not None and not is_int_at_least(
            self.representation_size, 1
        ):
            raise ValueError(
                f"representation_size={self.representation_size!r} must be a positive integer "
                "(None: no pre-logits layer)"
            )
        if self.num_classes is not None and not is_int_at_least(self.num_classes, 0):
            raise ValueError(
                f"num_classes={self.num_classes!r} must be a positive integer (None or 0: no head)"
            )
        for name in ("dropout_rate", "attention_dropout_rate"):
            rate = getattr(self, name)
            number = isinstance(rate, int | float | np.floating) and not isinstance(rate, bool)
            if not (number and 0 <= rate < 1):
                raise ValueError(f"{name}={rate!r} must be a number in [0, 1)")
        try:
            floating = jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise ValueError(
                f"dtype={self.dtype!r}: the compute dtype is a floating type, e.g. jnp.float32 or "
                "jnp.bfloat16"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        super().__post_init__()

    @property
    def has_class_token(self) -> bool:
        return self.classifier in ("token", "token_unpooled")

    def _class_token_only(self) -> bool:
        """Whether the output needs the class token's features alone (`Encoder`'s `output_tokens`):
        a "token" classifier, unless the call keeps intermediates (attention maps need every
        query of every layer)."""
        return self.classifier == "token" and not self.is_mutable_collection("intermediates")

    @property
    def stride(self) -> tuple[int, int]:
        """Pixels per patch along (H, W), the ResNet stem's downsampling included."""
        s = 1 if self.resnet_layers is None else resnet.stem_stride(self.resnet_layers)
        return (s * self.patch_size[0], s * self.patch_size[1])

    def grid_size(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """Patch grid (gh, gw) for an image size (an int means square); ValueError if not divisible."""
        h, w = image_hw(image_size)
        sh, sw = self.stride
        if h % sh or w % sw:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the patch size {sh}x{sw}"
                + ("" if self.resnet_layers is None else " (ResNet stem stride included)")
                + f"; use a size that is, e.g. {max(sh, h // sh * sh)}x{max(sw, w // sw * sw)}"
            )
        return h // sh, w // sw

    def attention_path(self) -> str:
        """The attention kernel its blocks run ("cudnn", "xla" or "einsum"; `attention_path`);
        ValueError for `attention="cudnn"` where cuDNN's flash attention cannot run."""
        return attention_path(self.attention, self.dtype, self.hidden_size // self.num_heads)

    def num_tokens(self, image_size: int | Sequence[int]) -> int:
        """Sequence length the encoder sees at `image_size`: patches (+1 for the class token)."""
        gh, gw = self.grid_size(image_size)
        return gh * gw + int(self.has_class_token)

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        if images.ndim != 4:
            raise ValueError(f"expected NHWC images of rank 4, got shape {images.shape}")
        self.grid_size(images.shape[1:3])
        x = images.astype(self.dtype)
        if self.resnet_layers is not None:
            x = resnet.resnet_stem(x, self.resnet_layers, self.resnet_width_factor, self.dtype)

        x = PatchEmbedding(
            self.hidden_size, tuple(self.patch_size), dtype=self.dtype, name="embedding"
        )(x)
        n, gh, gw, c = x.shape
        x = x.reshape(n, gh * gw, c)
        if self.has_class_token:
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, c)), x], axis=1)

        x = Encoder(
            num_layers=self.num_layers,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            dtype=self.dtype,
            remat=self.remat,
            attention=self.attention,
            name="Transformer",
        )(x, train=train, output_tokens=1 if self._class_token_only() else None)

        if self.classifier == "token":
            x = x[:, 0]
        elif self.classifier == "gap":
            x = jnp.mean(x, axis=1)

        if self.representation_size is not None:
            x = nn.tanh(nn.Dense(self.representation_size, name="pre_logits")(x))

        if self.num_classes:
            x = nn.Dense(
                self.num_classes,
                kernel_init=nn.initializers.zeros,
                bias_init=nn.initializers.constant(self.head_bias_init),
                name="head",
            )(x)
        return x


def get_model(name: str, num_classes: int | None = 1000, **overrides: Any) -> VisionTransformer:
    """Builds a published model size by name, e.g. `get_model('ViT-B_16', num_classes=10)`.

    `overrides` replace any `VisionTransformer` attribute (`dtype=jnp.bfloat16`, `dropout_rate=0.1`,
    `representation_size=768`, ...). Unknown names raise ValueError listing the known ones.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(VARIANTS)}")
    fields = VisionTransformer.__dataclass_fields__
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown model option(s) {unknown}; VisionTransformer takes {list(fields)}"
        )
    return VisionTransformer(num_classes=num_classes, **{**VARIANTS[name], **overrides})


def param_shapes(model: VisionTransformer, image_size: int | Sequence[int] = 224) -> Any:
    """The parameter tree as `jax.ShapeDtypeStruct`s, computed without running the model."""
    h, w = image_hw(image_size)
    images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(images.shape, images.dtype), train=False)
    )
    return variables["params"]


def count_params(model: VisionTransformer, image_size: int | Sequence[int] = 224) -> int:
    """Number of parameters at `image_size` (the position embedding grows with the image)."""
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(param_shapes(model, image_size)))
