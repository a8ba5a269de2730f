"""The nested model, knowing nothing of RL: which layers to skip (U_x, f_{x,b}, skip policies, Block Influence)
and running without them.

May import: config, models, store.
"""
