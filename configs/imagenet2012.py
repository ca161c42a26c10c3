r"""Fine-tune a published ViT on imagenet2012 (TFDS), with the reference's recipe.

python -m vit_jax.train --config configs/imagenet2012.py:ViT-B_16 --vit_pretrained_dir ~/vit_models
python -m vit_jax.train --config configs/imagenet2012.py:runlocal     # tiny model, a few steps
"""

from vit_jax.train import preset


def get_config(arg=None):
    # Put the ImageNet tar files in --tfds_manual_dir (TFDS cannot download them).
    return preset("imagenet2012", arg, total_steps=20_000)
