"""Read, adapt and write ViT checkpoints in the published `.npz` layout.

The published files (`gs://vit_models/imagenet21k/ViT-B_16.npz`, the ImageNet-21k+2012 fine-tuned
files, AugReg's `augreg/*.npz`, the hybrids) hold flat `/`-joined names, e.g.
`Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel`. Our model's parameter tree
uses exactly these names, so loading is a read plus `normalize`, which also accepts:

- a `params/` or `opt/target/` prefix (flax training checkpoints),
- Linen-renumbered block names (`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`),
- big_vision's layout: a top-level `pos_embedding` (without the class token's entry) and blocks stacked
  over a leading layer axis by `nn.scan` (`Transformer/encoderblock/...`),
- hybrid GroupNorm parameters stored as (1, 1, 1, C).

Files are read with `allow_pickle=False`: checkpoints are untrusted input and nothing in them is ever
executed.

Command line:
    python -m vit_jax.checkpoint inspect FILE.npz
    python -m vit_jax.checkpoint convert IN OUT.npz     (IN: any layout above, or an orbax checkpoint)
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import pathlib
import re
import sys
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from vit_jax.commands import (
    atomic_path,
    cache_dir,
    first_line,
    interruptible,
    prog,
    user_path,
)

PUBLISHED_HELP = (
    "The published ViT checkpoints are in the public Google Cloud Storage bucket gs://vit_models/: "
    "imagenet21k/{MODEL}.npz (ImageNet-21k, e.g. ViT-B_16.npz), "
    "imagenet21k+imagenet2012/{MODEL}.npz (fine-tuned on ImageNet at 384px) and augreg/*.npz. "
    "Fetch one with `gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz .` or "
    "`wget https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz`, "
    "or pass the gs:// or https:// address directly (it is downloaded once and cached)."
)

# Linen numbers submodules per type; the published (pre-Linen) files number them per block.
_LINEN_BLOCK_NAMES = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_GROUPNORM = re.compile(r"(^|/)(gn_root|gn_proj|gn\d+)/(scale|bias)$")
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what to do."""


Params = dict[str, Any]


# ----------------------------------------------------------------------------- reading


def _cached_name(url: str) -> str:
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return os.path.join(cache_dir(), f"{digest}-{os.path.basename(url.rstrip('/'))}")


def _download(url: str, progress: bool = True) -> str:
    """Copies a gs:// or http(s):// file into the cache once (atomically) and returns the local path."""
    local = _cached_name(url)
    if os.path.exists(local):
        return local
    with atomic_path(local) as tmp, open(tmp, "xb") as out:
        try:
            _copy_url(url, out, progress)
        except CheckpointError:
            raise
        except Exception as e:  # OSError/HTTPException (https), tf.errors.OpError (gs://)
            raise CheckpointError(
                f"could not download {url} ({type(e).__name__}: {first_line(e)}); nothing "
                f"was kept, so running again starts over. {PUBLISHED_HELP}"
            ) from None
    return local


def _copy_url(url: str, out: Any, progress: bool) -> None:
    import tqdm

    if url.startswith("gs://"):
        from tensorflow.io import gfile  # only for gs://

        if not gfile.exists(url):
            raise CheckpointError(f"checkpoint {url} not found. {PUBLISHED_HELP}")
        size = gfile.stat(url).length
        reader = gfile.GFile(url, "rb")
    else:
        reader = urllib.request.urlopen(url, timeout=60)
        size = int(reader.headers.get("Content-Length") or 0) or None
    with (
        reader,
        tqdm.tqdm(
            total=size, unit="B", unit_scale=True, desc=os.path.basename(url), disable=not progress
        ) as bar,
    ):
        while chunk := reader.read(8 << 20):
            out.write(chunk)
            bar.update(len(chunk))
        if size is not None and bar.n != size:
            raise OSError(f"the connection closed after {bar.n} of {size} bytes")


def _expand(path: str) -> str:
    """`path` with '~' expanded, unless it is a gs:// or http(s):// address."""
    return path if _is_url(path) else os.path.expanduser(path)


def _is_url(path: str) -> bool:
    return re.match(r"^(gs|https?)://", path) is not None


def resolve(path: str, progress: bool = True) -> str:
    """A local path for `path`: itself, or a cached download of a gs:// / http(s):// address."""
    if _is_url(path):
        return _download(path, progress)
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} not found. {PUBLISHED_HELP}")
    return path


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Reads every array of an `.npz` as {name: array}, refusing pickled objects."""
    local = resolve(path)
    if os.path.isdir(local):
        raise CheckpointError(
            f"{path} is a directory, not an .npz; a run's orbax checkpoints (a run directory, its "
            "checkpoints/ or best/) become one with `python -m vit_jax.checkpoint convert DIR "
            "FILE.npz`"
        )
    cached = f" (cached copy: {local})" if local != path else ""
    if os.path.isfile(local) and not zipfile.is_zipfile(local):
        raise CheckpointError(
            f"{path} is not an .npz checkpoint: it is not a zip archive, as an .npz is (a download "
            "cut short leaves such a truncated file: delete it and fetch it again)" + cached
        )
    try:
        with np.load(local, allow_pickle=False) as npz:
            flat = {}
            for name in npz.files:
                try:
                    flat[name] = npz[name]
                except ValueError as e:
                    if "allow_pickle" in str(e):
                        raise CheckpointError(
                            f"{path}: array {name!r} holds pickled Python objects; refusing to load "
                            "it (a checkpoint is untrusted input and unpickling can run code). "
                            "Re-export the file with plain numeric arrays."
                        ) from None
                    raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f"{path} is not a readable .npz checkpoint ({type(e).__name__}: {e}); the file may be "
            "truncated by an interrupted download: delete it and fetch it again." + cached
        ) from None
    return flat


def _strip_prefix(flat: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    for prefix in ("opt/target/", "params/"):
        if "embedding/kernel" not in flat and any(k.startswith(prefix) for k in flat):
            return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}, prefix
    return flat, ""


def normalize(flat: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """Maps any known layout onto the published names. Returns (flat params, layout description)."""
    flat, prefix = _strip_prefix(dict(flat))
    layout = []

    stacked = {k: v for k, v in flat.items() if k.startswith("Transformer/encoderblock/")}
    if stacked:
        layout.append("scanned blocks")
        depth = next(iter(stacked.values())).shape[0]
        for name, value in stacked.items():
            del flat[name]
            rest = name[len("Transformer/encoderblock/") :]
            for i in range(depth):
                flat[f"Transformer/encoderblock_{i}/{rest}"] = value[i]

    linen_blocks = {
        m.group(0)
        for k in flat
        if (m := _BLOCK.match(k)) and "/MultiHeadDotProductAttention_0/" in k
    }
    if linen_blocks:
        layout.append("Linen block names")
    renamed = {}
    for name, value in flat.items():
        m = _BLOCK.match(name)
        if m and m.group(0) in linen_blocks:
            module, _, rest = name[m.end() :].partition("/")
            name = f"{m.group(0)}{_LINEN_BLOCK_NAMES.get(module, module)}/{rest}"
        if _GROUPNORM.search(name) and value.ndim == 4:
            value = value.reshape(-1)
            if "GroupNorm (1,1,1,C)" not in layout:
                layout.append("GroupNorm (1,1,1,C)")
        renamed[name] = value
    flat = renamed

    if "pos_embedding" in flat:  # big_vision: added before the class token is prepended
        posemb = flat.pop("pos_embedding")
        if "cls" in flat:
            posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
        flat["Transformer/posembed_input/pos_embedding"] = posemb
        layout.append("big_vision pos_embedding")

    required = ("embedding/kernel", "Transformer/encoder_norm/scale")
    if not all(k in flat for k in required) or not any(_BLOCK.match(k) for k in flat):
        shown = "".join(f"\n  {k} {tuple(np.shape(v))}" for k, v in list(flat.items())[:25])
        if not flat:
            holds = "the file holds no arrays"
        elif len(flat) <= 25:
            holds = f"the file holds {len(flat)} array{'s' * (len(flat) > 1)}:{shown}"
        else:
            holds = f"the file holds {len(flat)} arrays, the first 25:{shown}"
        raise CheckpointError(
            "unrecognised checkpoint layout: expected ViT names such as "
            f"{', '.join(required)} and Transformer/encoderblock_0/...; {holds}"
        )
    name = "big_vision" if "big_vision pos_embedding" in layout or stacked else "published"
    details = ([f"prefix {prefix!r}"] if prefix else []) + layout
    return flat, name + (f" ({', '.join(details)})" if details else "")


def load(path: str) -> Params:
    """Reads a checkpoint into a nested dict of numpy arrays: an `.npz` (local path, gs:// or
    http(s)://), or a local directory of `vit_jax.train`'s orbax checkpoints (a run directory, its
    checkpoints/ or best/: the latest step; see `load_orbax_params`).

    The tree has the published names whatever the file's layout (see the module docstring).
    """
    if not _is_url(path) and os.path.isdir(_expand(path)):
        return load_orbax_params(path)
    flat, _ = normalize(read_npz(path))
    return unflatten_dict(flat, sep="/")


# ----------------------------------------------------------------------------- writing


def save(params: Mapping[str, Any], path: str) -> str:
    """Writes params as a published-layout `.npz` (flat `/` names, float32), atomically.

    Accepts a nested dict (ours, or any layout `normalize` knows) of numpy or jax arrays. Returns path.
    """
    flat, _ = normalize({k: np.asarray(v) for k, v in flatten_dict(params, sep="/").items()})
    flat = {k: np.asarray(v, dtype=np.float32) for k, v in flat.items()}
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        np.savez(f, **flat)
    return path


# ----------------------------------------------------------------------------- structure


def square_grid(num_patches: int) -> tuple[int, int] | None:
    """(g, g) when `num_patches` is a perfect square g*g, else None."""
    g = math.isqrt(num_patches)
    return (g, g) if g * g == num_patches else None


def infer_config(params: Params) -> dict[str, Any]:
    """Reads the architecture off a published-layout tree: `VisionTransformer` kwargs + `grid_size`.

    `grid_size` is (g, g) for the stored position embedding, assumed square as in every published file.
    """
    t = params["Transformer"]
    block = t["encoderblock_0"]
    kh, kw, _, hidden = params["embedding"]["kernel"].shape
    classifier = "token" if "cls" in params else "gap"
    ntok = t["posembed_input"]["pos_embedding"].shape[1] - (classifier == "token")
    resnet_layers = None
    if "conv_root" in params:
        resnet_layers = tuple(
            len(params[f"block{i}"]) for i in range(1, 10) if f"block{i}" in params
        )
    config = dict(
        patch_size=(kh, kw),
        hidden_size=hidden,
        num_layers=sum(k.startswith("encoderblock_") for k in t),
        num_heads=block["MultiHeadDotProductAttention_1"]["query"]["kernel"].shape[1],
        mlp_dim=block["MlpBlock_3"]["Dense_0"]["kernel"].shape[1],
        classifier=classifier,
        representation_size=(
            params["pre_logits"]["kernel"].shape[1] if params.get("pre_logits") else None
        ),
        resnet_layers=resnet_layers,
        num_classes=params["head"]["kernel"].shape[-1] if "head" in params else None,
        grid_size=square_grid(ntok),
    )
    return config


_ARCH_KEYS = ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim", "resnet_layers")


def matching_variants(config: Mapping[str, Any]) -> list[str]:
    """Names in the variant table whose architecture equals an `infer_config` result."""
    from vit_jax.variants import VARIANTS

    def arch(entry: Mapping[str, Any]) -> tuple:
        values = {"resnet_layers": None, "classifier": "token", **entry}
        resnet = values["resnet_layers"]
        return (
            *(values[k] for k in _ARCH_KEYS[:-1]),
            None if resnet is None else tuple(resnet),
            values["classifier"] in ("token", "token_unpooled"),
        )

    return [name for name, entry in VARIANTS.items() if arch(entry) == arch(config)]


# ----------------------------------------------------------------------------- position embeddings


def resize_posemb(
    posemb: np.ndarray,
    grid_size: Sequence[int],
    has_class_token: bool,
    old_grid_size: Sequence[int] | None = None,
) -> np.ndarray:
    """Resizes a (1, [1 +] gh*gw, D) position embedding to a (new_gh, new_gw) grid.

    Like the reference: the class token's entry is kept, and the grid is resized by bilinear
    interpolation with corner-aligned sampling, i.e. `scipy.ndimage.zoom(..., order=1)` (not what
    `jax.image.resize` does). Unlike the reference, the target grid may be non-square. The old grid is
    taken as square unless `old_grid_size` is given.
    """
    import scipy.ndimage

    posemb = np.asarray(posemb)
    ntok = 1 if has_class_token else 0
    tok, grid = posemb[:, :ntok], posemb[0, ntok:]
    if old_grid_size is None:
        old_grid_size = square_grid(len(grid))
        if old_grid_size is None:
            raise CheckpointError(
                f"position embedding with {len(grid)} patch entries is not a square grid; "
                "pass old_grid_size=(gh, gw)"
            )
    gh, gw = (int(s) for s in grid_size)
    oh, ow = old_grid_size
    grid = grid.reshape(oh, ow, -1)
    if (oh, ow) != (gh, gw):
        grid = scipy.ndimage.zoom(grid, (gh / oh, gw / ow, 1), order=1)
    if grid.shape[:2] != (gh, gw):  # zoom rounds the output shape; never expected to differ
        raise AssertionError(f"zoom produced {grid.shape[:2]}, wanted {(gh, gw)}")
    return np.concatenate([tok, grid.reshape(1, gh * gw, -1)], axis=1).astype(posemb.dtype)


def interpolate_posembed(posemb: np.ndarray, num_tokens: int, has_class_token: bool) -> np.ndarray:
    """The reference's call: resize to `num_tokens` entries (class token included) on a square grid."""
    grid = square_grid(num_tokens - (1 if has_class_token else 0))
    if grid is None:
        raise CheckpointError(
            f"num_tokens={num_tokens} does not make a square grid; use resize_posemb with (gh, gw)"
        )
    return resize_posemb(posemb, grid, has_class_token)


# ----------------------------------------------------------------------------- fine-tuning


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def compare(restored: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Report lines for names missing (+), unexpected (-) or of another shape (!) vs `expected`."""
    got, want = flatten_dict(restored, sep="/"), flatten_dict(expected, sep="/")
    lines = [
        f"! {k}: checkpoint {_shape(got[k])}, model {_shape(want[k])}"
        for k in want
        if k in got and _shape(got[k]) != _shape(want[k])
    ]
    lines += [
        f"+ {k} {_shape(want[k])} (missing from the checkpoint)" for k in want if k not in got
    ]
    lines += [f"- {k} {_shape(got[k])} (not in the model)" for k in got if k not in want]
    return lines


_REPORT_LINES = 12


def adapt(
    restored: Params,
    target: Mapping[str, Any],
    *,
    has_class_token: bool,
    representation_size: int | None,
    grid_size: Sequence[int] | None = None,
    source: str = "checkpoint",
) -> Params:
    """Fits restored params to a model's param tree `target` (arrays or shape structs).

    The head comes from `target`; `pre_logits` is dropped when `representation_size` is None; the
    position embedding is resized to `grid_size` (default: square from `target`). Every other name and
    shape must match, else one CheckpointError lists the differences.
    """
    restored = dict(restored)
    if representation_size is None:
        restored.pop("pre_logits", None)
    restored.pop("head", None)
    if "head" in target:
        restored["head"] = target["head"]

    t = restored.get("Transformer", {})
    posemb = t.get("posembed_input", {}).get("pos_embedding")
    want = target.get("Transformer", {}).get("posembed_input", {}).get("pos_embedding")
    if posemb is not None and want is not None and _shape(posemb) != _shape(want):
        ntok = _shape(want)[1] - (1 if has_class_token else 0)
        grid_size = grid_size or square_grid(ntok)
        if grid_size is None:
            raise CheckpointError(
                f"the model has {ntok} patches, not a square grid: pass grid_size=(gh, gw)"
            )
        if _shape(posemb)[-1] == _shape(want)[-1]:
            restored["Transformer"] = {
                **t,
                "posembed_input": {
                    "pos_embedding": resize_posemb(posemb, grid_size, has_class_token)
                },
            }

    report = compare(restored, target)
    if report:
        try:  # which model the file holds says more than a long list
            config = infer_config(restored)
            names = " / ".join(matching_variants(config)) or "a model not in the variant table"
            holds = f" It holds {names} ({_describe(config)})."
        except (KeyError, IndexError, AttributeError, TypeError, ValueError):
            holds = ""
        more = len(report) - _REPORT_LINES
        raise CheckpointError(
            f"{source} does not fit the model.{holds} {len(report)} differences (! shape, "
            "+ missing, - unexpected):\n  "
            + "\n  ".join(report[:_REPORT_LINES])
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
    bad = unusable_values(flatten_dict(restored, sep="/"))
    if bad:
        more = f", and {len(bad) - 3} more arrays" if len(bad) > 3 else ""
        why = " (NaN or infinite weights: a damaged file, or a run that diverged)"
        raise CheckpointError(
            f"{source} cannot be used: {'; '.join(bad[:3])}{more}; use another checkpoint"
            + (why if any(line.endswith("infinite values") for line in bad) else "")
        )
    return jax.tree.map(lambda v: np.asarray(v, dtype=np.float32), restored)


def unusable_values(flat: Mapping[str, Any]) -> list[str]:
    """What makes arrays of a flat {name: array} unusable as weights, one line per array: a dtype
    that is not floating point, or NaN / infinite values (with how many)."""
    bad = []
    for name, value in flat.items():
        value = np.asarray(value)
        if not jax.numpy.issubdtype(value.dtype, jax.numpy.floating):
            bad.append(f"{name} holds {value.dtype} values, not floating-point weights")
            continue
        finite = np.isfinite(value)
        if not finite.all():
            bad.append(f"{name} holds {value.size - int(finite.sum()):,} NaN or infinite values")
    return bad


def load_pretrained(
    *,
    pretrained_path: str,
    init_params: Mapping[str, Any],
    model_config: Any,
    grid_size: Sequence[int] | None = None,
) -> Params:
    """Params for fine-tuning from a published checkpoint (the reference's call and arguments).

    Args:
      pretrained_path: the `.npz` (local, gs:// or https://), any layout `normalize` knows.
      init_params: the new model's initialised params; its head (zeros) replaces the checkpoint's, and
        every other name and shape must match.
      model_config: the `VisionTransformer`, or a reference-style ConfigDict/dict with `classifier` and
        `representation_size`. `pre_logits` is kept only when `representation_size` is set.
      grid_size: the new (gh, gw) patch grid, needed only when it is not square.

    Returns a nested dict of float32 numpy arrays shaped like `init_params`, position embeddings
    resized (corner-aligned bilinear) to the new resolution.
    """
    return adapt(
        load(pretrained_path),
        init_params,
        has_class_token=_get(model_config, "classifier", "token") in ("token", "token_unpooled"),
        representation_size=_get(model_config, "representation_size"),
        grid_size=grid_size,
        source=pretrained_path,
    )


def load_pretrained_model(
    name: str | None,
    path: str,
    num_classes: int | None = None,
    image_size: int | Sequence[int] | None = None,
    **overrides: Any,
) -> tuple[Any, Params]:
    """A model and its params from a published checkpoint, ready for inference.

    `num_classes=None` keeps the checkpoint's head (and `pre_logits`); another number starts a new zero
    head. `image_size=None` uses the checkpoint's resolution; another size resizes the position
    embeddings. `name=None` picks the variant from the file's shapes (or, when none matches, builds the
    architecture the shapes describe). `overrides` go to `get_model`.
    """
    from vit_jax.models import VisionTransformer, get_model, image_hw, param_shapes

    restored = load(path)
    config = infer_config(restored)
    candidates = matching_variants(config)
    if name is not None and name not in candidates:
        raise CheckpointError(
            f"{path} does not hold a {name} model: it looks like "
            f"{' / '.join(candidates) or 'no known model'} ({_describe(config)})"
        )
    head = {
        "num_classes": config["num_classes"] if num_classes is None else num_classes,
        "representation_size": config["representation_size"],
    }
    if name is None and not candidates:  # e.g. a fine-tuned run with custom sizes
        arch = {k: config[k] for k in (*_ARCH_KEYS, "classifier")}
        model = VisionTransformer(**arch, **head, **overrides)
    else:
        model = get_model(name or candidates[0], **head, **overrides)
    if image_size is None:
        if config["grid_size"] is None:
            raise CheckpointError(f"{path}: non-square position embedding; pass image_size")
        image_size = tuple(g * s for g, s in zip(config["grid_size"], model.stride, strict=True))
    hw = image_hw(image_size)
    target = param_shapes(model, hw)
    if num_classes is None and "head" in restored:
        target = {**target, "head": restored["head"]}
    elif "head" in target:
        target = {
            **target,
            "head": {k: np.zeros(v.shape, np.float32) for k, v in target["head"].items()},
        }
    params = adapt(
        restored,
        target,
        has_class_token=model.has_class_token,
        representation_size=model.representation_size,
        grid_size=model.grid_size(hw),
        source=path,
    )
    return model, params


def _describe(config: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={config[k]}" for k in (*_ARCH_KEYS, "classifier") if k in config)


# ----------------------------------------------------------------------------- orbax


def saved_steps(directory: str) -> list[int]:
    """The steps of the orbax checkpoints in `directory` (a run's `checkpoints/`), ascending; [] if
    there are none or no such directory (unfinished saves, `<step>.orbax-checkpoint-tmp-*`, excluded)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def load_orbax_params(directory: str) -> Params:
    """The `params` subtree of an orbax checkpoint written by `vit_jax.train` (a step directory, a
    run's `checkpoints/` or `best/` directory with the latest step taken, or the run directory), as
    numpy arrays."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.path.expanduser(directory))
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        directory = os.path.join(directory, "checkpoints")
    steps = saved_steps(directory)
    if steps:
        directory = os.path.join(directory, str(steps[-1]))

    def restore(path: str) -> Any:
        # Host arrays, whatever devices the run had: restoring to the saved shardings fails on a
        # machine with fewer devices (a run trained on 8 GPUs, inspected on a laptop).
        metadata = ocp.PyTreeCheckpointHandler().metadata(pathlib.Path(path))
        as_numpy = jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), getattr(metadata, "tree", metadata)
        )
        return ocp.PyTreeCheckpointer().restore(
            path, args=ocp.args.PyTreeRestore(restore_args=as_numpy)
        )

    if os.path.isdir(os.path.join(directory, "params")):  # best/<step>: the params alone
        return jax.tree.map(np.asarray, restore(os.path.join(directory, "params")))
    item = os.path.join(directory, "state")
    if not os.path.isdir(item):
        raise CheckpointError(
            f"{directory} is not an orbax checkpoint written by vit_jax.train (give a run "
            "directory, its checkpoints/ or best/, one step of them, or an .npz file)"
        )
    tree = restore(item)
    if "params" not in tree:
        raise CheckpointError(f"{item} holds no 'params' (keys: {sorted(tree)})")
    return jax.tree.map(np.asarray, tree["params"])


# ----------------------------------------------------------------------------- CLI


def inspect(path: str) -> str:
    """A printable report: layout, names and shapes, parameter count, matching models; for an .npz,
    or a run's orbax checkpoint directory (its params)."""
    path = _expand(path)
    if os.path.isdir(path):
        flat = flatten_dict(load_orbax_params(path), sep="/")
        layout = "orbax checkpoint written by vit_jax.train (its params)"
    else:
        flat, layout = normalize(read_npz(path))
    config = infer_config(unflatten_dict(flat, sep="/"))
    total = sum(int(np.prod(v.shape)) for v in flat.values())
    width = max(len(k) for k in flat) + 2
    lines = [f"{path}", f"layout: {layout}", f"{len(flat)} arrays, {total:,} parameters", ""]
    lines += [f"{k:<{width}}{v.shape!s:<22}{v.dtype}" for k, v in sorted(flat.items())]
    grid = config["grid_size"]
    matches = matching_variants(config)
    lines += [
        "",
        f"architecture: {_describe(config)}, representation_size={config['representation_size']}",
        f"head: {config['num_classes']} classes"
        + (f"; position embedding grid {grid[0]}x{grid[1]}" if grid else ""),
        f"matches: {', '.join(matches) if matches else 'no model in the variant table'}",
    ]
    lines += [f"unusable: {line}" for line in unusable_values(flat)]
    return "\n".join(lines)


def convert(src: str, dst: str, overwrite: bool = False) -> str:
    """Any readable checkpoint (npz of a known layout, or an orbax training checkpoint) -> published npz.

    An existing `dst` (the source itself included) is replaced only with `overwrite=True`.
    """
    src, dst = _expand(src), os.path.expanduser(dst)
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(
            f"{dst} exists; choose another name, or pass --overwrite to replace it"
        )
    return save(load(src), dst)


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog("vit_jax.checkpoint"), description="Inspect and convert ViT checkpoints."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="names, shapes, detected layout, matching model, count")
    p.add_argument(
        "file",
        type=user_path,
        help="an .npz (local path, gs:// or https://), or a run's orbax checkpoint directory",
    )
    p = sub.add_parser("convert", help="write any readable checkpoint in the published npz layout")
    p.add_argument(
        "src", type=user_path, help="an .npz of a known layout, or an orbax checkpoint directory"
    )
    p.add_argument(
        "dst", type=user_path, help="the .npz to write (an existing file only with --overwrite)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing dst")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            print(inspect(args.file))
        else:
            print(f"wrote {convert(args.src, args.dst, args.overwrite)}")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
