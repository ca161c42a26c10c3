"""`python -m vit_jax`: lists the installed commands; `python -m vit_jax NAME ...` runs one."""

from vit_jax.commands import main

if __name__ == "__main__":
    main()
