"""Proposing subnets and running jobs: allocation rules, samplers, the search job, the CLI."""
