"""Algorithm 1 and what it needs: the ReFT loop, one update, the SFT warm-up, start-up checks, the data order,
metrics, checkpoints, run directories, FSDP2, the optimizer.

May import: algorithm, config, engines, models, nesting, store, tasks.
"""
