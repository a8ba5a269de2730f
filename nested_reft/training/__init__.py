"""Algorithm 1 and what it needs: the ReFT loop, one update, the SFT warm-up, metrics, checkpoints, run directories, FSDP2, the optimizer.

Imports algorithm, engines, nesting, tasks, models, config and store; never evaluation or experiments.
"""
