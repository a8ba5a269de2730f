"""Files and seeds: atomic writes, one-writer locks and the one reader of files read back; seeded generators.

May import: nothing.
"""
