"""mmmat: multimodal foundation-model training for inverse design of crystalline materials.

The library imports without Lightning or wandb; only :mod:`mmmat.tasks` and ``train.py`` need them.
"""

__version__ = "0.1.0"
