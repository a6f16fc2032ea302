"""Measuring models: data, perplexity, zero-shot accuracy, speed and memory, workers.

The Python API: :func:`evaluate` (perplexity and zero-shot of a model in memory, one record),
:func:`perplexity`, :func:`dataset_windows` and :class:`CalibrationSpec` (the text), and
:func:`compare` (speed and memory of models side by side)."""

from evaluators.data import CalibrationSpec, dataset_windows
from evaluators.perplexity import perplexity
from evaluators.speed import compare
from evaluators.suite import evaluate

__all__ = ["CalibrationSpec", "compare", "dataset_windows", "evaluate", "perplexity"]
