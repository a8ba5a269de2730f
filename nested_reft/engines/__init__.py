"""Sampling completions with behavior log-probs behind one interface: the eager, compiled and vLLM engines,
top-p, log-probs, rollouts.

May import: config, models, nesting, store.
"""
