"""pass@1 on the benchmarks and its record store (resumable, keyed by model, settings and problem).

Imports engines, tasks, models, config and store.
"""
