"""Grids, sweeps and studies: instances, running them, collecting results, reports, statistics, figures, probe,
demo.

May import: algorithm, config, engines, evaluation, models, nesting, store, tasks, training.
"""
