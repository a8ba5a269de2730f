"""The nested model: which layers to skip (U_x, f_{x,b}, skip policies, Block Influence) and running without them.

Imports config and models; knows nothing of RL.
"""
