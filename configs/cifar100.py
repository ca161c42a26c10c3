r"""Fine-tune a published ViT on cifar100 (TFDS), with the reference's recipe.

python -m vit_jax.train --config configs/cifar100.py:ViT-B_16 --vit_pretrained_dir ~/vit_models
python -m vit_jax.train --config configs/cifar100.py:runlocal     # tiny model, a few steps
"""

from vit_jax.train import preset


def get_config(arg=None):
    return preset("cifar100", arg)
