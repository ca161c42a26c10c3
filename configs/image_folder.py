r"""Fine-tune a published ViT on your own images: ROOT/{train,test}/<class>/<image file> (val/ or
validation/ also name the test split), or ROOT/<class>/<image file> with --config.test_fraction.

    python -m vit_jax.train --config configs/image_folder.py:/data/flowers --config.model=ViT-B_16
    python -m vit_jax.train --config configs/image_folder.py:/data/flowers,runlocal
    python -m vit_jax.train --config configs/image_folder.py:/data/pets --config.test_fraction=0.1

Unreadable files stop the run with their name; --config.skip_bad_images=True skips and counts them.
"""

from vit_jax.train import preset


def get_config(arg=None):
    root, _, rest = (arg or "").partition(",")
    if not root:
        raise ValueError("give the image folder: --config configs/image_folder.py:/path/to/ROOT")
    return preset(root, rest or None, total_steps=2000, warmup_steps=200, batch=128, accum_steps=1)
