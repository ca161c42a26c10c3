r"""Fine-tune a published ViT on oxford_iiit_pet (TFDS), with the reference's recipe.

python -m vit_jax.train --config configs/oxford_iiit_pet.py:ViT-B_16 --vit_pretrained_dir ~/vit_models
python -m vit_jax.train --config configs/oxford_iiit_pet.py:runlocal     # tiny model, a few steps
"""

from vit_jax.train import preset


def get_config(arg=None):
    return preset("oxford_iiit_pet", arg, total_steps=500, warmup_steps=100)
