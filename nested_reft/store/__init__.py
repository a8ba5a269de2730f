"""Files and seeds: atomic writes, locks and the one reader of files read back; seeded generators.

Imports nothing of nested_reft.
"""
