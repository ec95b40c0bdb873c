"""cfdpo: Counterfactual DPO (Butcher 2024, arXiv 2401.09566) for aligning language models."""

__version__ = "0.1.0"

from cfdpo.errors import CfdpoError
from cfdpo.recipe import Recipe, load_recipe

__all__ = ["CfdpoError", "Recipe", "load_recipe", "__version__"]
