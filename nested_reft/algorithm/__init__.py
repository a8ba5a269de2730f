"""Importance weights h_m, the GRPO objective and the k3 KL estimate: pure tensor functions, no model, optimizer
or I/O.

May import: config.
"""
