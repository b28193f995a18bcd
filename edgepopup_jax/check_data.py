"""`python -m edgepopup_jax.check_data`: lists the images of a data set that do not decode.

The command lives in edgepopup_jax/training/check_data.py (see its --help); this is its short name.
"""
from edgepopup_jax.training.check_data import cli

if __name__ == "__main__":
    cli()
