"""pass@1 on the benchmarks and its record store (resumable, keyed by model, settings and problem).

May import: config, engines, models, nesting, store, tasks.
"""
