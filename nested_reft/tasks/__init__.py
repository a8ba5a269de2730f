"""Problems and their loaders, the arithmetic task, prompts, the reward (with its deadlines) and the task that joins them.

Imports config and store.
"""
