"""Importance weights h_m and the GRPO objective: pure tensor functions, no model, optimizer or I/O.

Imports config only.
"""
