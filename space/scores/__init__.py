"""Importance scores by name: the registry and driver (:mod:`space.scores.base`) and the score
modules that register themselves into it on import. The cache of computed scores is
:mod:`space.scores.cache` (not imported here: it writes files through :mod:`space.export`)."""

from space.scores import elimination, gradients, influence, newton, osscar, statistics  # noqa: F401  (they register)
from space.scores.base import SCORES, LayerScores, ScoreContext, compute_scores, register_score, score_spec

__all__ = ["SCORES", "LayerScores", "ScoreContext", "compute_scores", "register_score", "score_spec"]
