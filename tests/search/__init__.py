"""Tests of llm-pruner, mirroring its packages."""
