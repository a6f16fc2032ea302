"""Measuring models: data, perplexity, zero-shot accuracy, speed and memory, workers."""
