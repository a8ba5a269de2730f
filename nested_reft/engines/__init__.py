"""Sampling completions with behavior log-probs: the eager, compiled and vLLM engines, top-p sampling, log-probs, rollouts.

Imports nesting, models, config and store; never the algorithm or the training loop.
"""
