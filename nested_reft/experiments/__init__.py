"""Grids, sweeps and studies: instances, running them, collecting results, reports, statistics, figures, probe, demo.

Imports everything below it; only the CLI imports it.
"""
