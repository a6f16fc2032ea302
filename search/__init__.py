"""The search and one-shot pruning: the width space, samplers, the fitness, the resumable job, the
seed systems as recipes, and the ``llm-pruner`` command (:mod:`search.cli`).

The Python API: :func:`prune` (one-shot pruning of a model object or a path, by a recipe or by
parts) and :func:`run_search` with a :class:`SearchConfig` (a search in a run folder).
"""

from search.config import SearchConfig
from search.job import SearchResult, run_search
from search.oneshot import RECIPES, OneShotCache, Pruned, prune, recipe_spec, reform_export, run_recipe

__all__ = ["RECIPES", "OneShotCache", "Pruned", "SearchConfig", "SearchResult", "prune", "recipe_spec",
           "reform_export", "run_recipe", "run_search"]
