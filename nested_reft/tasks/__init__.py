"""Problems and their loaders, the arithmetic task, prompts, the reward (with its deadlines), the task that joins
them.

May import: config, store.
"""
