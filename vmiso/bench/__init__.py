"""Benchmark scenarios for `vmiso bench` and benchmarks/: each reports medians with its baselines."""
