"""One-shot pruning: allocation rules, the seed systems' recipes (as data), their selection steps,
and the one pipeline that runs any recipe (:func:`prune`, :func:`run_recipe`)."""

from search.oneshot.pipeline import Pruned, prune, reform_export, run_recipe
from search.oneshot.recipes import RECIPES, Recipe, custom_recipe, recipe_spec
from search.oneshot.steps import OneShotCache, dense_copy

__all__ = ["RECIPES", "OneShotCache", "Pruned", "Recipe", "custom_recipe", "dense_copy", "prune", "recipe_spec",
           "reform_export", "run_recipe"]
