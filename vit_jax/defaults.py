"""The config file `python -m vit_jax.train` loads when no `--config` is given: `train.default_config()`.

Having a file behind the `--config` flag at all times is what lets `--config.KEY=VALUE` override any
field without naming a preset first (`--config.skip_bad_images=True`, `--config.keep_checkpoints=5`).
"""

from vit_jax.train import default_config


def get_config():
    return default_config()
