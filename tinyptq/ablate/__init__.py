"""Ablation runner: grid files, caching, executors, results store, report."""
